"""The gateway's own errors, in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.

Only errors the gateway itself decides (authentication, no router available, a router that broke off, unknown
gateway paths) are made here; every error about a request's content is the router's, vLLM's own, relayed as is."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
