"""The thin CSI node plugin (`nodecache csi`): bind-mounts the nodecache mount, or one model, read-only into pods.

Imports grpc and the generated stubs only when `nodecache.csi.driver` is imported.
"""
