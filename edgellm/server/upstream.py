"""Cloud-edge collaboration: forward a request to an OpenAI-compatible upstream (e.g. vLLM)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse, StreamingResponse

from edgellm.server.errors import APIError

SERVED_BY = "X-Edgellm-Served-By"


@dataclass(frozen=True)
class Upstream:
    url: str  # base URL ending in /v1
    key: str | None = None
    model: str | None = None  # rename the model when forwarding (local name -> upstream name)

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h

    async def forward(self, path: str, body: dict, reason: str):
        """Send body to the upstream's path; the answer says it came from upstream, and why."""
        import httpx

        if self.model:
            body = {**body, "model": self.model}
        headers = {SERVED_BY: "upstream", "X-Edgellm-Forward-Reason": reason}
        client = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10))
        url = self.url.rstrip("/") + path
        try:
            if not body.get("stream"):
                r = await client.post(url, json=body, headers=self._headers())
                await client.aclose()
                return JSONResponse(r.json(), r.status_code, headers=headers)
            request = client.build_request("POST", url, json=body, headers=self._headers())
            r = await client.send(request, stream=True)
        except (httpx.HTTPError, ValueError) as e:
            await client.aclose()
            raise APIError(502, f"the upstream server failed: {type(e).__name__}: {e}",
                           "upstream_error", "upstream_failed") from None

        async def relay():
            try:
                async for chunk in r.aiter_raw():
                    yield chunk
            finally:
                await r.aclose()
                await client.aclose()

        return StreamingResponse(relay(), r.status_code, headers=headers,
                                 media_type=r.headers.get("content-type", "text/event-stream"))
