"""A test kit for the pipeline: real daemons, real files, real stores, and the checks that compare them.

Like `zarr.testing`, it ships with the package so that the project's tests (and a facility's
own tests of its deployment) share one copy of each helper instead of importing each other:

- `configs`: a small config with free ports, and untrained weights in the shipped formats;
- `daemons`: start a real `pipeline run`, wait for its workers or for stores to finish, stop it;
- `stores`: compare two stores frame by frame, count done frames, process a scan offline;
- `files`: hand-built NeXus files of the kinds real beamlines and users produce;
- `fuzz`: hostile messages for the worker port;
- `pictures`: a processed scan for picture tests, and a check that a PNG shows something;
- `slow_worker`: a worker made slow on purpose (`python -m pipeline.testing.slow_worker`);
- `truth_stores`: stores written frame by frame by the project's writer from a simulated scan's truth (known peaks, no models);
- `web`: the web view on a free port, HTTP and event-stream clients, Debian's headless chromium.

Nothing in the product imports this package.
"""
