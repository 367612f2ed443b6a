"""CSI gRPC stubs, generated from `csi/csi.proto` with grpcio-tools, never committed.

`.ci/setup` (and so the Dockerfile) runs `python3 -m nodecache.csi.proto` once;
`load()` regenerates on first use when the stubs are missing or older than the
proto (a stamp holds the proto's sha256 and the grpcio-tools version), so a
checkout never depends on a hand-run step.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parent
OUT = PACKAGE_DIR / "_pb"
PROTO_CANDIDATES = (PACKAGE_DIR.parents[1] / "csi" / "csi.proto", PACKAGE_DIR / "csi.proto")


def proto_path() -> Path:
    for p in PROTO_CANDIDATES:
        if p.is_file():
            return p
    raise RuntimeError(f"csi.proto not found (looked at {', '.join(map(str, PROTO_CANDIDATES))})")


def _stamp(proto: Path) -> str:
    from importlib.metadata import version

    return hashlib.sha256(proto.read_bytes()).hexdigest() + " grpcio-tools " + version("grpcio-tools")


def generate(force: bool = False) -> Path:
    """Write csi_pb2.py and csi_pb2_grpc.py into nodecache/csi/_pb/ unless they are current."""
    proto = proto_path()
    stamp = _stamp(proto)
    stamp_file = OUT / "STAMP"
    if not force and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return OUT
    from importlib.resources import files

    from grpc_tools import protoc

    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        args = ["protoc", f"-I{proto.parent}", f"-I{files('grpc_tools') / '_proto'}"]
        args += [f"--python_out={tmp}", f"--grpc_python_out={tmp}", proto.name]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        grpc_py = Path(tmp, "csi_pb2_grpc.py")
        # protoc writes a top-level `import csi_pb2`; make it relative to this package.
        grpc_py.write_text(grpc_py.read_text().replace("import csi_pb2 as", "from . import csi_pb2 as"))
        Path(tmp, "__init__.py").write_text("")
        for name in ("__init__.py", "csi_pb2.py", "csi_pb2_grpc.py"):
            os.replace(Path(tmp, name), OUT / name)
    tmp_stamp = OUT / f".STAMP.{os.getpid()}"
    tmp_stamp.write_text(stamp)
    os.replace(tmp_stamp, stamp_file)
    return OUT


def load() -> tuple[ModuleType, ModuleType]:
    """(csi_pb2, csi_pb2_grpc), generating them first if needed."""
    generate()
    pb2 = importlib.import_module("nodecache.csi._pb.csi_pb2")
    grpc_mod = importlib.import_module("nodecache.csi._pb.csi_pb2_grpc")
    return pb2, grpc_mod


if __name__ == "__main__":
    out = generate(force="--force" in sys.argv)
    print(f"CSI stubs in {out}")
