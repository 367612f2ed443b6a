"""One frozen dataclass holds every setting; nothing else reads the environment.

Settings come from, lowest priority first: defaults here, `NODECACHE_<FIELD>`
environment variables, then command-line flags.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import connstate, layout
from .upstream.sourcespec import (
    check_endpoint,
    hide_userinfo,
    parse_repo_token_files,
    parse_s3_url,
    parse_sources,
)

MiB = 1024 * 1024
# Formats loaded with pickle: a wrong byte in them is code run by the loader, not a wrong weight.
PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.joblib")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key."""


@dataclass(frozen=True)
class Config:
    mount: Path | None = None  # FUSE mountpoint (its `hub/` is HF_HUB_CACHE); None: no mount
    cache_dir: Path = Path("/var/lib/nodecache")  # index + blob store
    repos: tuple[str, ...] = ()  # "[datasets/]org/name[@rev]" resolved at start
    hub_url: str = "https://huggingface.co"
    hub_token: str | None = field(default=None, repr=False)
    listen: str = "127.0.0.1:8470"  # health, metrics, control API
    chunk_size: int = 8 * MiB  # unit of fetch, verification and presence; power of two
    read_ahead_chunks: int = 8  # on a miss at chunk k, also fetch k+1..k+R
    fill_on_open: bool = True  # first open of a blob fills it whole in the background
    fill_snapshot_on_open: bool = (
        True  # opening a weight file fills the snapshot's small files, then its sibling shards
    )
    parallel_per_blob: int = 8  # concurrent chunk fetches for one blob
    parallel_total: int = 32  # concurrent chunk fetches for the node
    fill_run_chunks: int = 2  # a whole-blob fill asks for up to this many consecutive chunks per request
    read_timeout: float = 300.0  # how long a read waits for its bytes before EIO
    retry_base: float = 0.2  # first retry backoff; doubles, jittered, capped at 5 s
    fsync: bool = True  # fdatasync a chunk before marking it present
    direct_io: bool = True  # prefetch writes chunks of blobs nobody has open around the page cache (O_DIRECT)
    hash_memory: int = 256 * MiB  # chunks that land ahead of their blob's in-order hash wait in memory up to this
    hash_nice: int = -5  # nice value of the threads that hash a fill for its proof (0: as the rest of the daemon)
    shard_read_ahead: int = 16 * 1024 * MiB  # complete shards after the one a loader reads: into the page cache
    bdi_read_ahead_kb: int = 16384  # written to the mount's bdi after FUSE_INIT
    passthrough: bool = True  # complete blobs are read by the kernel from the store file (Linux >= 6.9)
    keeper_socket: Path | None = None  # `nodecache keeper`'s socket: the FUSE connection outlives the daemon
    handover_grace: float = 0.5  # at stop, answer requests in flight this long; the next daemon gets the rest
    keeper_wait: float = 30.0  # at start, wait this long for the previous daemon to let go of the connection
    state_format: int = 3  # the connection-state format handed over (1, 2: for a rollback to an older daemon)
    ref_ttl: float = 600.0  # re-resolve branch refs after this many seconds
    disk_max: int = 0  # byte quota of the disk tier (<cache_dir>/blobs); 0: the filesystem's size
    shm_dir: Path | None = None  # optional shared-memory tier, e.g. /dev/shm/nodecache
    shm_max: int = 0  # byte quota of the shm tier; 0: the filesystem's size
    shm_file_max: int = 64 * MiB  # blobs up to this size (and blobs of "hot" pins) go to shm
    high_watermark: float = 0.9  # evict when a tier is fuller than this fraction...
    low_watermark: float = 0.8  # ...down to this fraction
    min_free: int = 256 * MiB  # always leave this much free on each tier's filesystem
    # "[REPO_GLOB=]PATH_GLOB": reads of matching files wait for the whole-blob proof; ("*",): all; (): none
    verify_before_serve: tuple[str, ...] = PICKLE_GLOBS
    scrub_bps: int = 32 * MiB  # bytes/s the background scrub re-hashes complete blobs at; 0: off
    scrub_interval: float = 86400.0  # a complete blob is re-hashed in the background at most this often
    quarantine_files: int = 16  # per tier: blobs that failed their proof, kept for inspection (newest first)...
    quarantine_max: int = 4 << 30  # ...up to this many bytes...
    quarantine_ttl: float = 7 * 86400.0  # ...for at most this many seconds
    admin_token: str | None = field(default=None, repr=False)  # required by mutating /v1 calls when set
    preload: tuple[str, ...] = ()  # "org/name[@rev][=pin|=hot]" filled at start, in this order
    on_demand: tuple[str, ...] = ()  # globs of repo ids a lookup may resolve upstream, e.g. "org/*"
    mirror_allow: tuple[str, ...] | None = None  # globs of repos mirror calls may fetch; None: as a lookup may
    mirror_public: tuple[str, ...] = ()  # globs of repos the mirror serves to any caller, whatever their sources say
    sources: tuple[str, ...] = ()  # "org/name=hf,s3://bucket/prefix": a repo's upstreams, tried in order per chunk
    s3_endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, moto); default: AWS via the boto3 chain
    s3_region: str | None = None  # default: the boto3 chain's
    s3_path_style: bool = False  # path-style bucket addressing (MinIO)
    http_auth_file: Path | None = None  # header for http sources: "Bearer xyz" or "Name: value" (never logged)
    repo_tokens: tuple[str, ...] = ()  # "org/name=/path/token-file": a per-repo HF token (private/gated repos)
    peers: tuple[str, ...] = ()  # static cluster members, "host:port" of their --listen
    peers_dns: str | None = None  # "name:port" of a headless Service; its A records are the members
    advertise: str | None = None  # this node's "host:port" as peers see it (default: listen)
    cluster_token: str | None = field(default=None, repr=False)  # peers must present it
    peer_timeout: float = 20.0  # a chunk fetch from a peer gives up after this (then: next source)
    peer_uploads: int = 8  # concurrent chunk uploads to peers, so peers cannot starve local reads
    peer_upload_bps: int = 0  # bytes/s this node serves to peers in total; 0: no cap
    node_name: str | None = None  # this Kubernetes node (KUBE_NODE_NAME): label it with the repos it holds
    kube_api: str | None = None  # API server URL; default: in-cluster from the service account
    kube_token_file: Path | None = None  # with kube_api: a bearer token file
    compile_cache_max: int = 0  # bytes of compile caches (trees + sealed blobs); 0: no quota
    compile_cache_seal_after: float = 60.0  # seal a compile cache after its tree has been quiet this long
    compile_cache_fill_timeout: float = 60.0  # a publish waits this long for a peer's snapshot, then goes on
    compile_cache_upstream: str | None = None  # "s3://bucket/prefix": sealed snapshots also kept there

    def __post_init__(self) -> None:
        _check_types(self)
        if self.chunk_size < 64 * 1024 or self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"chunk_size: {self.chunk_size} is not a power of two >= 64 KiB")
        for key in ("read_ahead_chunks", "parallel_per_blob", "parallel_total", "fill_run_chunks", "peer_uploads"):
            if getattr(self, key) < (0 if key == "read_ahead_chunks" else 1):
                raise ConfigError(f"{key}: {getattr(self, key)} is out of range")
        if not -20 <= self.hash_nice <= 19:
            raise ConfigError(f"hash_nice: {self.hash_nice} is not a nice value (-20 to 19)")
        if not self.read_timeout > 0:  # also refuses NaN
            raise ConfigError("read_timeout: must be > 0")
        if not 0 <= self.handover_grace <= 60:  # also refuses NaN
            raise ConfigError("handover_grace: must be between 0 and 60 seconds")
        if not 0 < self.keeper_wait <= 600:  # also refuses NaN
            raise ConfigError("keeper_wait: must be > 0 and at most 600 seconds")
        if self.state_format not in connstate.FORMATS:
            raise ConfigError(f"state_format: {self.state_format} is not one of {connstate.FORMATS}")
        for key in ("quarantine_ttl", "scrub_interval"):
            if not getattr(self, key) >= 0:  # also refuses NaN
                raise ConfigError(f"{key}: must be >= 0")
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"listen: {self.listen!r} is not HOST:PORT")
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ConfigError("low_watermark/high_watermark: need 0 < low <= high <= 1")
        for key in ("compile_cache_seal_after", "compile_cache_fill_timeout"):
            if not 0 < getattr(self, key) < 1e9:  # also refuses NaN
                raise ConfigError(f"{key}: must be > 0 seconds")
        for key in sorted((_SIZE_KEYS - {"chunk_size"}) | {"quarantine_files"}):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0")
        for key in ("repos", "preload"):
            for spec in getattr(self, key):
                spec, _, mode = spec.partition("=")
                if mode not in ("", "pin", "hot"):
                    raise ConfigError(f"{key}: {mode!r} is not pin or hot")
                try:
                    layout.RepoSpec.parse(spec)
                except layout.InvalidName as e:
                    raise ConfigError(f"{key}: {e}") from None
        if (self.peers or self.peers_dns) and not self.cluster_token:
            raise ConfigError(
                "cluster_token: peers/peers_dns are set but no cluster token is; every node of the cluster needs "
                "the same one (NODECACHE_CLUSTER_TOKEN), else anyone on the network could use the peer API"
            )
        for key in ("mirror_allow", "mirror_public"):
            for glob in getattr(self, key) or ():
                if not glob or "@" in glob or any(c.isspace() or not c.isprintable() for c in glob):
                    raise ConfigError(f"{key}: {glob!r} is not a repo glob like 'org/*' or 'datasets/org/name'")
        for pattern in self.verify_before_serve:
            repo_glob, sep, path_glob = pattern.partition("=")
            if not pattern or (sep and not (repo_glob and path_glob)):
                raise ConfigError(f"verify_before_serve: {pattern!r} is not [REPO_GLOB=]PATH_GLOB")
        _check_sources(self)  # non-HF sources: syntax only, no I/O

    def verify_first(self, repo_id: str, path: str) -> bool:
        """Whether reads of this file of this repo wait for its whole-blob proof (verify_before_serve)."""
        return any(r(repo_id) and p.match(path) for r, p in _verify_patterns(self.verify_before_serve))

    def verify_first_paths(self, repo_id: str) -> Callable[[str], bool]:
        """`verify_first` for the files of one repo: the path patterns that apply to it as one
        matcher, the repo patterns asked once (a snapshot brings 10^6 paths at a time)."""
        globs = [p.pattern for r, p in _verify_patterns(self.verify_before_serve) if r(repo_id)]
        if not globs:
            return lambda path: False
        match = re.compile("|".join(f"(?:{g})" for g in globs)).match
        return lambda path: match(path) is not None

    @property
    def me(self) -> str:
        """This node's peer address."""
        return self.advertise or self.listen

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].removeprefix("[").removesuffix("]")  # [::]:8470 -> ::

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def _check_types(cfg: Config) -> None:
    """Every value has its field's type (a YAML list where a string belongs stops here, named)."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        if value is None and "None" in kind:
            continue
        want = next(t for name, t in _TYPES if kind.startswith(name))
        if isinstance(value, bool) and want is not bool:  # bool is an int to Python, not to us
            want = ()
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, want) or (want is tuple and not all(isinstance(v, str) for v in value)):
            raise ConfigError(hide_userinfo(f"{f.name}: {value!r} is not a valid {kind.replace(' | None', '')}"))


_TYPES = (("Path", Path), ("str", str), ("int", int), ("float", float), ("bool", bool), ("tuple", tuple))
_SIZE_KEYS = {
    "chunk_size",
    "disk_max",
    "shm_max",
    "shm_file_max",
    "min_free",
    "peer_upload_bps",
    "hash_memory",
    "shard_read_ahead",
    "compile_cache_max",
    "quarantine_max",
    "scrub_bps",
}
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(raw: str) -> int:
    """`123`, `64Mi`, `1.5Gi`, `10G` -> bytes (Kubernetes quantity suffixes)."""
    text = raw.strip()
    num = text.rstrip("KMGTikmgt")
    unit = text[len(num) :].lower()
    if unit not in _UNITS or not num:
        raise ValueError(raw)
    return int(float(num) * _UNITS[unit]) if "." in num else int(num) * _UNITS[unit]


def _convert(f: dataclasses.Field, raw: str):
    kind = str(f.type)
    if "bool" in kind:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{f.name}: {raw!r} is not a boolean")
    if "Path" in kind:
        if raw:
            return Path(raw)
        if "None" in kind:  # an optional path: empty means unset
            return None
        raise ConfigError(f"{f.name}: must not be empty")
    if "tuple" in kind:
        if f.name == "verify_before_serve" and raw.lower() in ("true", "false"):
            return ("*",) if raw.lower() == "true" else ()
        return tuple(x for x in raw.replace(",", " ").split() if x)
    try:
        if kind.startswith("int"):
            return parse_size(raw) if f.name in _SIZE_KEYS else int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{f.name}: {raw!r} is not a number") from None
    return raw


def _preload_entry(item) -> str:
    """A YAML preload item: a spec string, or {repo, revision, pin: true|false|hot}."""
    if isinstance(item, str):
        return item
    if not isinstance(item, dict) or not isinstance(item.get("repo"), str):
        raise ConfigError(f"preload: {item!r} needs a 'repo'")
    spec = item["repo"] + (f"@{item['revision']}" if item.get("revision") else "")
    pin = item.get("pin", False)
    return spec + ("=hot" if pin == "hot" else "=pin" if pin is True else "")


def _check_sources(cfg: Config) -> None:
    """Syntax of the source settings and endpoints, at config time (no I/O); ConfigError names the key."""
    try:
        parse_sources(cfg.sources)
    except ValueError as e:
        raise ConfigError(f"sources: {e}") from None
    try:
        parse_repo_token_files(cfg.repo_tokens)
    except ValueError as e:
        raise ConfigError(f"repo_tokens: {e}") from None
    if cfg.compile_cache_upstream is not None:
        try:
            parse_s3_url(cfg.compile_cache_upstream)
        except ValueError as e:
            raise ConfigError(f"compile_cache_upstream: {e}") from None
    for key, why in (
        ("hub_url", "the Hub takes a token: --token-file or HF_TOKEN"),
        ("s3_endpoint_url", "S3 credentials come from the boto3 chain"),
        ("kube_api", "the API server takes a bearer token: kube_token_file"),
    ):
        if getattr(cfg, key) is not None:
            try:
                check_endpoint(getattr(cfg, key), why)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None


def _yaml_repos(items: list) -> tuple[tuple[str, ...], list[str]]:
    """YAML `repos` items: a spec string or `{id, revision?, sources?: [..]}` -> (specs, sources entries)."""
    specs, sources = [], []
    for item in items:
        if isinstance(item, str):
            specs.append(item)
            continue
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ConfigError(hide_userinfo(f"repos: {item!r} needs an 'id'"))  # its sources may have a password
        unknown = set(item) - {"id", "revision", "sources"}
        if unknown:
            raise ConfigError(f"repos: unknown key(s) {sorted(unknown)} in {item['id']!r}")
        specs.append(item["id"] + (f"@{item['revision']}" if item.get("revision") else ""))
        srcs = item.get("sources")
        if srcs:
            if isinstance(srcs, str):
                srcs = [srcs]
            sources.append(f"{item['id']}=" + ",".join(str(s) for s in srcs))
    return tuple(specs), sources


def read_file(path: Path) -> dict:
    """The YAML config file: keys are Config fields; unknown keys are an error."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"config: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must be a mapping of settings")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values: dict = {}
    extra_sources: list[str] = []  # sources given inside `repos` items
    for key, value in data.items():
        f = fields.get(str(key).replace("-", "_"))
        if f is None:
            raise ConfigError(f"{key}: unknown setting in {path}")
        if f.name == "preload":
            value = tuple(_preload_entry(v) for v in value or ())
        elif f.name == "verify_before_serve" and isinstance(value, bool):  # true: every file; false: none
            value = ("*",) if value else ()
        elif f.name == "repos" and isinstance(value, list):  # items may be {id, revision?, sources?}
            value, more = _yaml_repos(value)
            extra_sources.extend(more)
        elif isinstance(value, list):
            value = tuple(str(v) for v in value)
        elif value is not None and not isinstance(value, bool):
            value = _convert(f, str(value))
        values[f.name] = value
    if extra_sources:
        values["sources"] = (*values.get("sources", ()), *extra_sources)
    return values


def load(overrides: dict | None = None, environ: dict[str, str] | None = None, file: Path | None = None) -> Config:
    """Defaults < config file < NODECACHE_* env < overrides (flags); None overrides are ignored."""
    environ = os.environ if environ is None else environ
    file = file or (Path(environ["NODECACHE_CONFIG"]) if environ.get("NODECACHE_CONFIG") else None)
    values: dict = read_file(file) if file else {}
    for f in dataclasses.fields(Config):
        raw = environ.get("NODECACHE_" + f.name.upper())
        if raw is not None:
            values[f.name] = _convert(f, raw)
    if "hub_url" not in values and environ.get("HF_ENDPOINT"):
        values["hub_url"] = environ["HF_ENDPOINT"]
    if "node_name" not in values and environ.get("KUBE_NODE_NAME"):
        values["node_name"] = environ["KUBE_NODE_NAME"]
    if "hub_token" not in values and environ.get("HF_TOKEN"):
        values["hub_token"] = environ["HF_TOKEN"]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if values.get("mount") is not None:
        values["mount"] = Path(values["mount"])
    if values.get("keeper_socket") is not None:
        values["keeper_socket"] = Path(values["keeper_socket"])
    values["cache_dir"] = Path(values.get("cache_dir", Config.cache_dir))
    values["repos"] = tuple(values.get("repos", ()))
    try:
        return Config(**values)
    except TypeError as e:
        raise ConfigError(f"config: {e}") from None


@functools.lru_cache(maxsize=8)
def _verify_patterns(patterns: tuple[str, ...]) -> list[tuple]:
    """verify_before_serve as compiled (repo matcher, path pattern) pairs: checked once per file
    of every snapshot registered, 10^6 at a time, where fnmatch's per-call cache lookups showed."""
    out = []
    for pattern in patterns:
        repo_glob, sep, path_glob = pattern.partition("=")
        if not sep:
            repo_glob, path_glob = "*", pattern
        out.append((re.compile(fnmatch.translate(repo_glob)).match, re.compile(fnmatch.translate(path_glob))))
    return out
