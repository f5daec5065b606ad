"""The live web view: every scan's store under the configured roots, in a browser, while the scans run.

`index` finds the stores (and is the only way a request names one), `summary` says in one row what
a store holds, `monitor` looks at every store (and the daemon, when one answers) on its own thread,
`scanview` keeps the projection and rocking curves of the scans being looked at, `render` draws
PNGs, `stream` pushes changes to the pages (server-sent events), `app` is the Starlette
application, `server` runs it under uvicorn (`pipeline web`, or on a thread of `pipeline run`).
It only reads: stores through `pipeline.store.reader`, raw frames only under its roots.
"""
