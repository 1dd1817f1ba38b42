"""Errors the API answers with, in the OpenAI shape: {"error": {message, type, param, code}}."""

from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers


def error_body(message: str, kind: str, code=None, param=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
