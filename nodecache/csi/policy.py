"""Who may mount what through the CSI plugin: pod namespace (and service account) -> repo globs.

A pod that can declare an inline CSI volume names any repo it likes; the node
holds tokens for every tenant's private repos. The policy decides, per pod,
which names it may mount at all, and which of those may be private, gated or
from the operator's own sources (S3, HTTP, directories). `Policy` is pure (parse,
decide); `PolicyFile` is the only I/O: it re-reads the file when it changes
(a ConfigMap update swaps a symlink) and keeps the last good policy when a new
version does not parse, so a typo never refuses, or allows, more than before.

    rules:
      - namespace: "*"                      # name or glob
        repos: ["*", "*/*"]                 # public repos matching these
      - namespace: team-a
        serviceAccount: vllm                # optional: only pods running as it (name or glob)
        privateRepos: ["team-a/*", "datasets/team-a/*"]   # these whatever their visibility
        wholeCache: true                    # with --allow-whole-cache: the whole hub/
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import yaml

from ..layout import REPO_TYPES, RepoSpec

log = logging.getLogger(__name__)

ANY = "any"  # a grant: the repo whatever its visibility
PUBLIC = "public"  # a grant: the repo only if its source says it is public
MAX_BYTES = 1024 * 1024
MAX_RULES = 10_000
MAX_GLOBS = 100_000  # over all rules (YAML aliases can repeat one list many times)
RULE_KEYS = {"namespace", "serviceAccount", "repos", "privateRepos", "wholeCache"}
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._\-*?\[\]!]+$")


class PolicyError(ValueError):
    """A policy document that cannot be used; the message says where."""


def _glob(value: object, where: str) -> str:
    """A repo glob, one pattern per path segment: `org/*`, `*`, `datasets/org/*` (`models/` is dropped)."""
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{where}: a repo glob must be a non-empty string, not {value!r}")
    parts = value.split("/")
    if len(parts) == 3 and parts[0] == "models":
        parts = parts[1:]
    if len(parts) > 3 or any(not _SEGMENT_RE.fullmatch(p) for p in parts):
        raise PolicyError(f"{where}: {value!r} is not a repo glob like 'org/*' or 'datasets/org/*'")
    if len(parts) == 3 and parts[0] not in REPO_TYPES.values():
        raise PolicyError(f"{where}: {value!r} starts with {parts[0]!r}, not one of {sorted(REPO_TYPES.values())}")
    return "/".join(parts)


def _name_glob(value: object, where: str) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() or c == "/" for c in value):
        raise PolicyError(f"{where}: must be a name or glob without spaces or '/', not {value!r}")
    return value


def repo_matches(glob: str, repo_type: str, repo_id: str) -> bool:
    """Segment by segment, so `*/*` is every model of an org and never a dataset."""
    name = RepoSpec(repo_type, repo_id).name.split("/")
    pattern = glob.split("/")
    return len(name) == len(pattern) and all(fnmatchcase(n, p) for n, p in zip(name, pattern, strict=True))


@dataclass(frozen=True)
class Rule:
    namespace: str
    service_account: str | None = None
    repos: tuple[str, ...] = ()
    private_repos: tuple[str, ...] = ()
    whole_cache: bool = False

    def applies(self, namespace: str, service_account: str) -> bool:
        if not fnmatchcase(namespace, self.namespace):
            return False
        return self.service_account is None or fnmatchcase(service_account, self.service_account)


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    origin: str  # where it came from, for refusal messages
    needs_pod_info: bool = True  # a namespace must be known to decide
    broken: str | None = None  # why nothing is allowed: the file never loaded

    def grant(self, namespace: str, service_account: str, repo_type: str, repo_id: str) -> str | None:
        """ANY, PUBLIC or None (refused), over every rule that applies to the pod."""
        best = None
        for rule in self.rules:
            if not rule.applies(namespace, service_account):
                continue
            if any(repo_matches(g, repo_type, repo_id) for g in rule.private_repos):
                return ANY
            if any(repo_matches(g, repo_type, repo_id) for g in rule.repos):
                best = PUBLIC
        return best

    def whole_cache(self, namespace: str, service_account: str) -> bool:
        return any(r.whole_cache and r.applies(namespace, service_account) for r in self.rules)


# With no --policy: public repos for every pod (their bytes are no secret: anyone can download them),
# nothing private, gated or from the operator's own sources; the whole hub/ still needs --allow-whole-cache.
DEFAULT = Policy(
    rules=(Rule("*", repos=("*", "*/*", "datasets/*/*", "spaces/*/*"), whole_cache=True),),
    origin="the built-in default (no --policy: public repos only)",
    needs_pod_info=False,
)


def parse_policy(text: str, origin: str) -> Policy:
    """A policy document (YAML) -> Policy; anything unexpected is a PolicyError naming where."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise PolicyError("nested too deeply") from None
    if doc is None:
        raise PolicyError("empty document (write `rules: []` to refuse every volume)")
    if not isinstance(doc, dict) or set(doc) != {"rules"}:
        raise PolicyError("expected a mapping with exactly one key, `rules`")
    raw_rules = doc["rules"]
    if not isinstance(raw_rules, list) or len(raw_rules) > MAX_RULES:
        raise PolicyError(f"`rules` must be a list of at most {MAX_RULES} rules")
    rules = []
    total = 0
    for i, raw in enumerate(raw_rules):
        where = f"rules[{i}]"
        if not isinstance(raw, dict):
            raise PolicyError(f"{where}: expected a mapping")
        unknown = set(raw) - RULE_KEYS
        if unknown:
            raise PolicyError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; known: {sorted(RULE_KEYS)}")
        if "namespace" not in raw:
            raise PolicyError(f"{where}: `namespace` is required (a name or a glob such as '*')")
        globs = {}
        for key in ("repos", "privateRepos"):
            value = raw.get(key, [])
            if not isinstance(value, list):
                raise PolicyError(f"{where}.{key}: expected a list of repo globs")
            total += len(value)
            if total > MAX_GLOBS:
                raise PolicyError(f"more than {MAX_GLOBS} repo globs in all")
            globs[key] = tuple(_glob(g, f"{where}.{key}[{j}]") for j, g in enumerate(value))
        whole = raw.get("wholeCache", False)
        if not isinstance(whole, bool):
            raise PolicyError(f"{where}.wholeCache: expected true or false, not {whole!r}")
        sa = raw.get("serviceAccount")
        rules.append(
            Rule(
                namespace=_name_glob(raw["namespace"], f"{where}.namespace"),
                service_account=None if sa is None else _name_glob(sa, f"{where}.serviceAccount"),
                repos=globs["repos"],
                private_repos=globs["privateRepos"],
                whole_cache=whole,
            )
        )
    return Policy(tuple(rules), origin)


class PolicyFile:
    """The policy in a file, re-read whenever the file it names changes; thread-safe.

    A version that does not load is logged once (one line) and ignored: the last
    good policy stays in force, or, if none ever loaded, every volume is refused.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple | None = None  # identity of the version last read, good or bad
        self._good: Policy | None = None
        self._error: str | None = None

    def current(self) -> Policy:
        with self._lock:
            self._refresh()
            if self._good is not None:
                return self._good
            return Policy((), str(self.path), broken=self._error or "not loaded")

    def _refresh(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self._failed(("missing", e.errno), f"cannot open it: {e.strerror}")
            return
        try:
            st = os.fstat(fd)
            seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if seen == self._seen:
                return
            data = os.read(fd, MAX_BYTES + 1)  # a ConfigMap is at most 1 MiB
        except OSError as e:
            self._failed(("unreadable", e.errno), f"cannot read it: {e.strerror}")
            return
        finally:
            os.close(fd)
        try:
            if len(data) > MAX_BYTES:
                raise PolicyError(f"larger than {MAX_BYTES} bytes")
            policy = parse_policy(data.decode("utf-8"), str(self.path))
        except UnicodeDecodeError:
            self._failed(seen, "not UTF-8 text")
            return
        except PolicyError as e:
            self._failed(seen, str(e))
            return
        self._seen, self._good, self._error = seen, policy, None
        log.info("CSI policy %s loaded: %d rule(s)", self.path, len(policy.rules))

    def _failed(self, seen: tuple, why: str) -> None:
        if seen == self._seen:
            return  # this version was already reported
        self._seen, self._error = seen, why
        keeping = "keeping the policy loaded before" if self._good else "refusing every volume until it loads"
        log.error("CSI policy %s: %s; %s", self.path, " ".join(why.split()), keeping)
