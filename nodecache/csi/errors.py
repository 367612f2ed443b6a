"""The one error the CSI plugin answers with: a gRPC status code and a message for kubelet."""

from __future__ import annotations

import grpc


class CsiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
