"""`splitserve bench --backend openai`: the same workloads against any OpenAI-compatible `/v1/completions` endpoint,
streamed, with TTFT and inter-token gaps timed at the client from the server-sent events, so that splitserve and
other servers are measured on equal terms."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from splitserve.proto.client import GenerateResult


class HttpStatusError(RuntimeError):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status


class OpenAIClient:
    """The slice of `splitserve.proto.client.AsyncClient` the bench driver uses, over HTTP."""

    def __init__(self, base_url: str, token: str | None, model: str):
        self.base_url, self.model = base_url.rstrip("/"), model
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "OpenAIClient":
        self.session = aiohttp.ClientSession(headers=self.headers)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def models(self) -> list[str]:
        async with self.session.get(f"{self.base_url}/models") as resp:
            if resp.status != 200:
                raise HttpStatusError(resp.status, await resp.text())
            return [m["id"] for m in (await resp.json())["data"]]

    async def generate(self, prompt, *, stream: bool = True, request_id: str | None = None,
                       timeout: float | None = None, max_tokens: int, temperature: float = 0.0,
                       ignore_eos: bool = False) -> GenerateResult:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        if ignore_eos:  # an extension that splitserve and vLLM accept; --stop-at-eos leaves it out
            body["ignore_eos"] = True
        result = GenerateResult(request_id or "", [], "", None)
        start = last = time.perf_counter()
        text = []
        async with self.session.post(f"{self.base_url}/completions", json=body,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                raise HttpStatusError(resp.status, await resp.text())
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise HttpStatusError(503, json.dumps(event["error"]))
                now = time.perf_counter()
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        if result.ttft_s is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        text.append(choice["text"])
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                usage = event.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.completion_tokens = usage.get("completion_tokens", 0)
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        result.e2e_s = time.perf_counter() - start
        result.text = "".join(text)
        return result


async def wait_ready(base_url: str, token: str | None, timeout_s: float, interval_s: float = 0.2) -> None:
    deadline, last = time.monotonic() + timeout_s, "no answer"
    async with OpenAIClient(base_url, token, "") as client:
        while time.monotonic() < deadline:
            try:
                await client.models()
                return
            except (aiohttp.ClientError, HttpStatusError) as e:
                last = str(e)
            await asyncio.sleep(interval_s)
    raise TimeoutError(f"server at {base_url} not ready after {timeout_s:g}s (last: {last})")


async def model_info(base_url: str, token: str | None, model: str | None, max_context: int, vocab_size: int) -> dict:
    """What the workload builder needs; an OpenAI endpoint tells only the model names, so the rest is given."""
    async with OpenAIClient(base_url, token, "") as client:
        names = await client.models()
    if model is None:
        if not names:
            raise ValueError(f"model: {base_url}/models lists no model; name one with --model")
        model = names[0]
    return {"model": model, "architecture": "", "max_context": max_context, "vocab_size": vocab_size,
            "eos_token_ids": [], "has_tokenizer": True, "dtype": ""}
