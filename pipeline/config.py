"""The daemon's configuration: loaded from YAML and validated once, at the edge.

Every section is a strict pydantic model (unknown keys are errors). `load_config` turns any
problem into a `ConfigError` whose message is one line naming the file, the key and the value.
Relative paths in a config file are resolved against that file's directory (socket files of `ipc://` endpoints too).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.common.endpoints import check_endpoint, resolve_socket_path
from pipeline.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A configuration that cannot be used; the message is one line for the user."""

    exit_code = 2


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WatchSettings(Strict):
    dirs: list[Path] = Field(default_factory=list, description="directories watched for new scan files")
    patterns: list[str] = Field(default_factory=lambda: ["*.nxs"])
    recursive: bool = True
    mode: Literal["auto", "events", "polling"] = "auto"  # polling for network mounts
    poll_interval_s: float = Field(1.0, gt=0)
    rescan_interval_s: float = Field(10.0, gt=0)  # catches events the observer missed
    resume_existing: bool = True  # at start-up, finish scans whose store is not complete


I16_DETECTORS = ["pil3_100k", "pilatus3_100k", "pil100k", "pil3", "pilatus"]


class FollowSettings(Strict):
    # the detector's group names tried in order (then any NXdetector with data); I16's first
    detectors: list[str] = Field(default_factory=lambda: list(I16_DETECTORS), min_length=1)
    entries: list[str] = Field(default_factory=lambda: ["entry", "entry1"])
    # frames of any shape are read (taken from each scan's file); set this to accept only one shape, e.g. [195, 487]
    frame_shape: tuple[int, int] | None = None
    max_frame_pixels: int = Field(8 * 2**20, gt=0)  # a larger frame is refused: it bounds every frame's memory and message
    # link and group walks of a scan file (the confinement check) are bounded: a file with more is refused, naming the limit
    max_links: int = Field(20_000, gt=0)
    max_group_depth: int = Field(32, gt=0)
    poll_interval_s: float = Field(0.05, gt=0)
    settle_s: float = Field(0.5, ge=0)  # no keys: the newest frame counts once the shape held this long (and its chunk is on disk)
    idle_timeout_s: float = Field(30.0, gt=0)  # no new frame this long and no end marker: incomplete
    link_timeout_s: float = Field(60.0, gt=0)  # external-link target must appear within this
    open_timeout_s: float = Field(30.0, gt=0)
    # besides the watched directories, where scan files may link to (external links, virtual datasets, external
    # raw storage); nothing outside them is read. With no watched directory (`pipeline process`): the scan's own directory
    allowed_roots: list[Path] = Field(default_factory=list)
    # after an end marker, frames still outstanding (zero keys, fewer frames than expected) are waited for this long
    end_grace_s: float = Field(10.0, ge=0)
    # a frame read never decompresses more than this: chunked datasets whose chunk holds more are refused (see pipeline.common.chunks)
    max_chunk_mib: float = Field(32.0, gt=0)
    # frames stored in more chunks (tiles) than this are refused: each costs a chunk-index lookup (2 x 2 tiles: 43 s a frame)
    max_chunks_per_frame: int = Field(4096, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _one_detector(cls, data: Any) -> Any:
        """`detector: NAME` (the older key) means `detectors: [NAME, ...I16's names]`."""
        if isinstance(data, dict) and "detector" in data:
            data = dict(data)
            name = data.pop("detector")
            data["detectors"] = [name, *[d for d in data.get("detectors", I16_DETECTORS) if d != name]]
        return data


class SlurmSettings(Strict):
    """`workers.slurm`: worker jobs the daemon submits to SLURM itself (pipeline.cluster.slurm), 0 to `jobs` of them
    with the frames waiting; with `workers.local: 0` the daemon uses SLURM alone."""

    jobs: int = Field(4, ge=1)  # at most this many worker jobs at once
    partition: str | None = None  # null: the cluster's default partition
    sbatch_args: list[str] = Field(default_factory=list)  # more sbatch options, e.g. [--account=i16, --qos=high]
    time_limit: str = "02:00:00"  # each job's --time; a job that reaches it is replaced while frames wait
    cpus_per_job: int = Field(4, ge=1)  # --cpus-per-task, and the worker's torch threads
    gpus_per_job: int = Field(0, ge=0)  # --gres=gpu:N; 0: none
    # jobs beyond what the frames waiting need (all of them once no scan is active and nothing waits) are cancelled
    # after this long
    idle_s: float = Field(300.0, gt=0)
    # a job's worker ends when the daemon has been unreachable this long (`pipeline worker --leave-after`): a daemon
    # killed, or its host down, leaves no job holding a node (and its GPU) until the time limit. A daemon restarted
    # sooner keeps them: they rejoin it
    orphan_s: float = Field(300.0, gt=0)
    # what jobs connect to. null: the daemon's own socket file (jobs on this host only); for other nodes workers.bind's
    # address as the nodes see it, e.g. tcp://beamline-host:5555 (CurveZMQ: the nodes read the key files)
    endpoint: str | None = None
    bin_dir: Path | None = None  # where sbatch, squeue and scancel are; null: found on PATH
    # the jobs' script, config and logs (<job name>-<job id>.log): a directory the nodes see. null: ~/.pipeline/slurm
    log_dir: Path | None = None
    poll_s: float = Field(5.0, gt=0)  # how often squeue is asked about the jobs
    command_timeout_s: float = Field(30.0, gt=0)  # an sbatch, squeue or scancel that takes longer is killed

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint(value)

    @field_validator("bin_dir", "log_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_absolute():
            raise ValueError(f"must be an absolute path (the nodes see it as it is), not {str(value)!r}")
        return None if value is None else value.expanduser()


class WorkerSettings(Strict):
    local: int = Field(2, ge=0)  # worker processes the daemon starts itself
    # the program a local worker runs, before the options the daemon adds (--connect, --config, ...);
    # null: this Python's `-m pipeline worker`. E.g. [nice, -n, "10", /opt/pipeline/bin/pipeline, worker]
    command: list[str] | None = Field(None, min_length=1)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = Field(4, ge=1)
    # adaptive batching (pipeline.live.batching): a worker takes as many waiting frames (a bucket: 1, 2, 4, ... up to
    # batch_size) as its models, by the times they took so far, still finish within this many seconds of the oldest
    # one's arrival; null: every waiting frame up to batch_size (what suits a CPU, where batches buy nothing)
    latency_target_s: float | None = Field(None, gt=0)
    credit: int = Field(8, ge=1)  # frames a worker may hold at once
    # where workers on other hosts connect (e.g. tcp://0.0.0.0:5555); null: none, local workers only (they use a
    # socket file in a directory only the daemon's user can open). Beyond loopback only with CurveZMQ or `insecure`
    bind: str | None = None
    insecure: bool = False  # allow binding beyond loopback without CurveZMQ (a network you trust entirely)
    heartbeat_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(30.0, gt=0)  # a worker silent this long is dead; its frames go elsewhere
    # a worker that holds frames and answers none for this long is dropped; its frames go elsewhere
    # (a worker that keeps delivering keeps its queue; one frame held `credit` times this long is dropped too)
    task_timeout_s: float = Field(300.0, gt=0)
    threads: int = Field(0, ge=0)  # torch CPU threads per local worker; 0 = the machine's cores shared out between the local workers
    curve_secret_key: Path | None = None  # set to require CurveZMQ: this side's `.key_secret` file
    authorized_keys: Path | None = None  # daemon: directory of workers' public `.key` files
    server_public_key: Path | None = None  # remote worker: the daemon's public `.key` file
    slurm: SlurmSettings | None = None  # worker jobs the daemon submits to SLURM; null: none

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint(value)

    @model_validator(mode="after")
    def _no_open_door(self) -> WorkerSettings:
        host = (self.bind or "").removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
        if self.bind and host not in ("127.0.0.1", "localhost", "::1") and self.curve_secret_key is None and not self.insecure:
            raise ValueError(f"bind {self.bind} reaches beyond this host without CurveZMQ: set workers.curve_secret_key "
                             "(pipeline keys generate), or workers.insecure: true on a network you trust")
        if self.slurm is not None and (self.slurm.endpoint or "").startswith("tcp://") and not self.bind:
            raise ValueError(f"slurm.endpoint {self.slurm.endpoint} needs workers.bind (where the daemon listens for it)")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")


class TLMSettings(Strict):
    enabled: bool = True
    weights: Path | None = None  # None: the shipped weights/tlm.safetensors
    backbone: str | None = None  # None: from the weights' model card
    min_size: int | None = Field(None, ge=32)
    max_size: int | None = Field(None, ge=32)
    score_threshold: float | None = Field(None, ge=0, le=1)
    nms_iou: float | None = Field(None, gt=0, le=1)
    proposals: int | None = Field(None, ge=1, le=4000)  # region proposals per frame the box head scores (None: the card's)
    detections: int | None = Field(None, ge=1, le=256)  # at most this many detections per frame (None: the card's)


class SSLMSettings(Strict):
    enabled: bool = True
    weights: Path | None = None  # None: the shipped weights/sslm.safetensors
    peak_channels: list[int] | None = None  # None: from the weights' model card
    # the SSLM's two inner convolutions in int8 (pipeline.models.onnx_quantize; the onnxruntime backend only): 0.38x its
    # float32 time on CPUs with AVX-512 VNNI, every `pipeline evaluate` figure within 0.006 (scripts/int8_eval.py)
    int8: bool = False


class ModelSettings(Strict):
    # bfloat16: both models under autocast, ~1.6x faster on CPUs with AVX-512 BF16 or AMX, the same
    # held-out figures within 0.01; slower on a GPU (H200: TLM 21 vs 9.4 ms). auto: bfloat16 on such CPUs, else float32
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # frames per model call, the batch always padded to this many with blank frames: the same kernels run whatever the
    # batch holds, so a frame's masks do not depend on its neighbours or on how many frames were waiting. 1 (frame by
    # frame) suits a CPU; a GPU wants 8-16 (measure with `pipeline bench --device cuda`)
    model_batch: int = Field(1, ge=1, le=64)
    # how each model call is padded. fixed: to model_batch (a frame's masks never depend on its batch). bucket: only to
    # the smallest of 1, 2, 4, ... model_batch holding the frames (a lone frame costs a one-frame call; a frame's masks
    # then depend on its batch's bucket, to float rounding: docs/models.md)
    batch_padding: Literal["fixed", "bucket"] = "fixed"
    # what runs the models (pipeline.models.backends). auto: onnxruntime on a CPU when it is installed and precision is
    # float32 there (~0.6x torch's time for the SSLM, ~0.8x for the TLM, and a worker without torch), torch on a GPU
    # and where bfloat16 runs; torch is the reference, onnxruntime gives the same masks (tests/test_onnx_backend.py)
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    # where the ONNX graphs exported from the weights in use are kept; null: $XDG_CACHE_HOME/pipeline/onnx, else
    # ~/.cache/pipeline/onnx (pipeline.models.onnx_export)
    onnx_cache: Path | None = None
    tlm: TLMSettings = TLMSettings()
    sslm: SSLMSettings = SSLMSettings()


class VolumeSettings(Strict):
    source: Literal["union", "tlm", "sslm"] = "tlm"  # which per-frame mask is linked into 3D peaks
    min_pixels: int = Field(5, ge=1)  # 2D components smaller than this (hot pixels, specks) are not linked


MIN_TABLE_REFRESH_S = 0.1  # the least `output.refresh_tables_s` (see there)


class OutputSettings(Strict):
    root: Path | None = None  # None: <scan>.zarr beside <scan>.nxs
    # folders a follow request (the Zocalo service's `output_root`) may name as where a scan's store goes instead, e.g.
    # the visit's processing folder; a scan's store is looked for under each too, so that a restarted daemon finds it
    # there and makes no second one. Empty: follow requests name none
    requested_roots: list[Path] = Field(default_factory=list)
    # how often the live peaks/detections tables are rewritten; at least 0.1 s: a reader of a table retries a read that a
    # rewrite overlapped, and a writer rewriting back to back would leave it no gap to read in
    refresh_tables_s: float = Field(2.0, ge=MIN_TABLE_REFRESH_S)
    # every file of a store flushed to the disk (and its directory) before it counts as written: survives a power cut,
    # costs a disk round trip per chunk (see pipeline.store.durable)
    fsync: bool = False
    # a scan stopped by a full disk (ENOSPC, quota) resumes once this much is free where its store is
    resume_free_mib: float = Field(64.0, ge=0)


class ReaderSettings(Strict):
    """The processes that open and read scan files: HDF5 never runs in the daemon (pipeline.live.readers)."""

    processes: int | None = Field(None, ge=1)  # null: one per active scan (daemon.max_active_scans)
    # one step of a reader (opening a file, reading its metadata, one look at a growing file, one read of frames) that
    # takes longer than this has its reader killed and its scan failed naming the step: HDF5 can block for minutes on
    # a damaged file, holding its process whole
    step_timeout_s: float = Field(5.0, gt=0)
    start_timeout_s: float = Field(20.0, gt=0)  # a new reader process must say it is ready within this


class DaemonSettings(Strict):
    # `pipeline status` asks here: by default a socket file in a directory only the daemon's user can open;
    # tcp://127.0.0.1:PORT for other users on this host (they then read scan and store paths)
    control: str = "ipc://~/.pipeline/control"
    max_active_scans: int = Field(4, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_file: Path | None = None
    metrics_port: int | None = Field(None, ge=0, le=65535)  # Prometheus endpoint; None: off, 0: any free port
    metrics_address: str = "127.0.0.1"
    audit_log: Path | None = None  # JSON line per frame done (scan, frame, pid): proves none lost or doubled

    @field_validator("control")
    @classmethod
    def _control(cls, value: str) -> str:
        return check_endpoint(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MIN_TOKEN_CHARACTERS = 16


class WebSettings(Strict):
    # the live web view (`pipeline web`, and `pipeline run` serves it on a thread when a port is set); null: off, 0: any free port
    port: int | None = Field(None, ge=0, le=65535)
    host: str = "127.0.0.1"  # beyond loopback only with a token
    # asked of every request (a cookie, `Authorization: Bearer`, or `?token=` once); required beyond loopback
    # (a secret: stores record it as "**********", logs never show it)
    token: SecretStr | None = Field(None, validate_default=True)
    roots: list[Path] = Field(default_factory=list)  # where stores are looked for; empty: output.root if set, else watch.dirs, + output.requested_roots
    poll_interval_s: float = Field(1.0, gt=0)  # how often stores are looked at for changes

    @field_validator("token")
    @classmethod
    def _no_open_door(cls, token: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        host = str(info.data.get("host", "127.0.0.1"))
        if token is None and host.strip("[]") not in LOOPBACK_HOSTS:
            raise ValueError(f"required when web.host ({host}) reaches beyond this host; set {MIN_TOKEN_CHARACTERS} characters or more")
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_CHARACTERS:
            raise ValueError(f"too short: {MIN_TOKEN_CHARACTERS} characters or more (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe())')")
        return token


class Config(Strict):
    watch: WatchSettings = WatchSettings()
    follow: FollowSettings = FollowSettings()
    readers: ReaderSettings = ReaderSettings()
    workers: WorkerSettings = WorkerSettings()
    models: ModelSettings = ModelSettings()
    volume: VolumeSettings = VolumeSettings()
    output: OutputSettings = OutputSettings()
    daemon: DaemonSettings = DaemonSettings()
    web: WebSettings = WebSettings()

    def for_workers(self) -> dict[str, Any]:
        """This config as the daemon hands it to the workers it starts (a file they load): without the web view's
        section, which a worker does not use and whose token JSON would only show as `**********` (no longer valid)."""
        data = self.model_dump(mode="json")
        data.pop("web", None)
        return data

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted keys replaced (`{"workers.local": 4}`), validated like a file."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return _validate(data, source="command line")


def _known_keys_hint(path: list[str]) -> str:
    """`did you mean 'workers.local'?` for a typo of a known key (difflib), else the keys its section has."""
    section: type[BaseModel] = Config
    for part in path[:-1]:
        annotation = section.model_fields[part].annotation if part in section.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "see pipeline.yaml for every key"
        section = annotation
    known = list(section.model_fields)
    close = difflib.get_close_matches(path[-1], known, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{'.'.join([*path[:-1], close[0]])}'?"
    return f"{'.'.join(path[:-1]) or 'the top level'} has: {', '.join(known)}"


def _one_line(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}' ({_known_keys_hint([str(part) for part in first['loc']])})"
    value = first.get("input")
    message = str(first["msg"]).removeprefix("Value error, ")
    if isinstance(value, dict) or key.endswith("token"):  # a whole section says nothing more; a secret is not echoed
        return f"{source}: {key}: {message}"
    return f"{source}: {key}: {message} (got {value!r})"


def _validate(data: Any, source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_one_line(error, source)) from None


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(path: Path | None) -> Path | None:
        return None if path is None else (path if path.is_absolute() else (base / path).resolve())

    data = config.model_dump()
    data["watch"]["dirs"] = [resolve(Path(p)) for p in data["watch"]["dirs"]]
    data["follow"]["allowed_roots"] = [resolve(Path(p)) for p in data["follow"]["allowed_roots"]]
    data["web"]["roots"] = [resolve(Path(p)) for p in data["web"]["roots"]]
    data["output"]["root"] = resolve(data["output"]["root"])
    data["output"]["requested_roots"] = [resolve(Path(p)) for p in data["output"]["requested_roots"]]
    data["daemon"]["log_file"] = resolve(data["daemon"]["log_file"])
    data["daemon"]["audit_log"] = resolve(data["daemon"]["audit_log"])
    data["daemon"]["control"] = resolve_socket_path(data["daemon"]["control"], base)
    if data["workers"]["bind"] is not None:
        data["workers"]["bind"] = resolve_socket_path(data["workers"]["bind"], base)
    for key in ("curve_secret_key", "authorized_keys", "server_public_key"):
        data["workers"][key] = resolve(data["workers"][key])
        if data["workers"][key] is not None and not data["workers"][key].exists():
            raise ConfigError(f"workers.{key}: not found: {data['workers'][key]}")
    data["models"]["onnx_cache"] = resolve(data["models"]["onnx_cache"])
    for model in ("tlm", "sslm"):
        weights = data["models"][model]["weights"]
        data["models"][model]["weights"] = resolve(weights)
        if weights is not None and not data["models"][model]["weights"].is_file():
            raise ConfigError(f"models.{model}.weights: file not found: {data['models'][model]['weights']}")
    return Config.model_validate(data)


def load_config(path: Path | None = None) -> Config:
    """The validated config from `path`; None gives the built-in defaults (which `pipeline.yaml` spells out)."""
    if path is None:
        return Config()
    source = Path(path)
    try:
        text = source.read_text()
    except OSError as error:
        raise ConfigError(f"{source}: cannot read config ({error.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}:{where} not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    return _resolve_paths(_validate(data, source=str(source)), source.resolve().parent)
