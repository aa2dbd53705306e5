"""The serving engine: one base model, any number of PEFT LoRA adapters, token-by-token decoding.

Decisions:
- Each adapter is a model name (as in vLLM): requests for the base name run with adapters
  disabled, requests for an adapter name activate it. Adapters load and unload at runtime.
- One lock around the model: on a CPU box one request at a time is the fastest schedule anyway,
  and PEFT's active adapter is global state.
- Our own decode loop with a KV cache, so streaming needs no extra threads and every token is
  produced under the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from offsite.errors import OffsiteError


class EngineError(OffsiteError):
    """A request the engine cannot serve; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Piece:
    """A chunk of generated text; the last one carries the finish reason and token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine:
    def __init__(self, model_path: Path | str, served_name: str, max_prompt_tokens: int = 2048):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        # as a plain Module: typeshed's functools.wraps, which transformers puts on
        # PreTrainedModel.to, does not bind self (the call still runs PreTrainedModel.to)
        base: torch.nn.Module = self.base
        base.to(self.device).eval()
        self.model: Any = self.base
        self.served_name = served_name
        self.max_prompt_tokens = max_prompt_tokens
        self.adapters: dict[str, dict[str, Any]] = {}  # served name -> path, time, PEFT name
        self._serial = 0
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ adapters

    def model_names(self) -> list[str]:
        return [self.served_name, *self.adapters]

    def load_adapter(self, name: str, path: str, inplace: bool = False) -> float:
        """Load a PEFT adapter folder under ``name``; returns the seconds it took.

        ``inplace`` replaces an adapter of the same name atomically (no window in which the
        name is missing), which is how a federation pushes each new round. A load that fails
        leaves the base model and every loaded adapter exactly as they were: the new adapter
        is built under a fresh internal name and only then swapped in; a failure removes
        whatever PEFT had injected.
        """
        if not name or name == self.served_name:
            raise EngineError(f"adapter name {name!r} is empty or the base model's name")
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise EngineError(
                f"{path} is not a PEFT adapter folder (no adapter_config.json); export one with "
                "`offsite export RUN`",
                status=400,
            )
        with self.lock:
            start = time.perf_counter()
            if name in self.adapters and not inplace:
                raise EngineError(
                    f"adapter {name!r} is already loaded; unload it first or pass "
                    '"load_inplace": true',
                    400,
                )
            self._serial += 1
            internal = f"adapter-{self._serial}"
            self._attach(folder, internal)
            previous = self.adapters.get(name)
            self.adapters[name] = {
                "path": str(folder),
                "created": int(time.time()),
                "internal": internal,
            }
            if previous is not None:
                self.model.delete_adapter(previous["internal"])
            self.model.eval()
            return time.perf_counter() - start

    def _attach(self, folder: Path, internal: str) -> None:
        """Attach a PEFT adapter as ``internal`` (lock held), or restore the model and raise."""
        from peft import PeftModel

        modules = {
            name: dict(module.named_children()) for name, module in self.base.named_modules()
        }
        was_base = self.model is self.base
        try:
            if was_base:
                self.model = PeftModel.from_pretrained(self.base, folder, adapter_name=internal)
            else:
                self.model.load_adapter(folder, adapter_name=internal)
        except Exception as err:  # PEFT raises many kinds; every one leaves the model restored
            if was_base:
                _restore_children(self.base, modules)
                self.model = self.base
            elif internal in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(internal)
            raise EngineError(f"cannot load adapter from {folder}: {err}", 400) from err

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise EngineError(f"adapter {name!r} is not loaded", 404, "not_found_error")
            internal = self.adapters.pop(name)["internal"]
            if self.adapters:
                self.model.delete_adapter(internal)
            else:  # PEFT breaks when its last adapter is deleted: unload gives back the base
                self.base = self.model.unload()
                self.model = self.base

    # ------------------------------------------------------------------ generation

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if not ids:
            raise EngineError("the prompt is empty")
        if len(ids) > self.max_prompt_tokens:
            raise EngineError(
                f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}",
                status=400,
            )
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode_prompt(str(text))

    def check_model(self, name: str) -> None:
        if name != self.served_name and name not in self.adapters:
            raise EngineError(
                f"model {name!r} does not exist; available: {', '.join(self.model_names())}",
                404,
                "not_found_error",
            )

    def generate(
        self,
        name: str,
        prompt_ids: list[int],
        sampling: Sampling,
        cancel: threading.Event | None = None,
    ) -> Iterator[Piece]:
        """Yield text pieces as they are decoded, holding the model lock meanwhile.

        Consume it to the end in one thread; ``cancel`` stops it at the next token (a client
        that hung up), which releases the lock.
        """
        self.check_model(name)
        with self.lock:
            yield from self._generate_locked(name, prompt_ids, sampling, cancel)

    def _decode(self, ids: list[int]) -> str:
        # one flat sequence of ids decodes to one str; transformers' list[str] is for batches
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))

    def _generate_locked(
        self,
        name: str,
        prompt_ids: list[int],
        sampling: Sampling,
        cancel: threading.Event | None,
    ) -> Iterator[Piece]:
        import contextlib

        if name == self.served_name:
            context = self.model.disable_adapter() if self.model is not self.base else None
        else:
            self.model.set_adapter(self.adapters[name]["internal"])
            context = None
        generator = torch.Generator(device="cpu")
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        eos = self.tokenizer.eos_token_id
        with torch.no_grad(), context or contextlib.nullcontext():
            ids = torch.tensor([prompt_ids], device=self.device)
            past = None
            produced: list[int] = []
            emitted = 0  # characters of the decoded text already sent
            # hold back enough characters that a stop string split across tokens is never sent
            holdback = max((len(s) for s in sampling.stop), default=1) - 1
            finish, stopped_by_string = "length", False
            for _ in range(sampling.max_tokens):
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                out = self.model(
                    input_ids=ids if past is None else ids[:, -1:],
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                token = _sample(out.logits[0, -1].float(), sampling, generator)
                if eos is not None and token == eos:
                    finish = "stop"
                    break
                produced.append(token)
                ids = torch.cat([ids, torch.tensor([[token]], device=self.device)], dim=1)
                text = self._decode(produced)
                stop_at = _find_stop(text, sampling.stop)
                if stop_at is not None:
                    finish, stopped_by_string = "stop", True
                    if stop_at > emitted:
                        yield Piece(text[emitted:stop_at])
                    break
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
                    continue
                upto = len(text) - holdback
                if upto > emitted:
                    yield Piece(text[emitted:upto])
                    emitted = upto
            if not stopped_by_string:
                text = self._decode(produced)
                if len(text) > emitted:
                    yield Piece(text[emitted:])
            yield Piece("", finish, len(prompt_ids), len(produced))


def _restore_children(root: torch.nn.Module, children: dict[str, dict[str, Any]]) -> None:
    """Put back every submodule a failed injection replaced (LoRA wraps modules in place)."""
    for parent_name, original in children.items():
        parent = root.get_submodule(parent_name) if parent_name else root
        for child_name, child in original.items():
            if getattr(parent, child_name, None) is not child:
                setattr(parent, child_name, child)
    for name in [n for n in vars(root) if n == "peft_config"]:
        delattr(root, name)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1).cpu()
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))
