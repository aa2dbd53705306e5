"""Distill the emulator's kept middle blocks against the full model's middle (offsite-tuning KD).

Recipe (the reference's): loss = LM loss + 30 × normalised MSE between the teacher's and the
student's hidden state at the exit of the middle (the input of the top adapter blocks). Embeddings
and bottom blocks are identical in both models, so both middles see the same input. Only the
student's middle blocks train; adapter blocks, embeddings and head stay as shipped.

With ``jacobian_weight`` > 0 a second term aligns what the *bottom adapter* sees, not only the
middle's output: the bottom adapter's update reaches the middle as a small change of its input,
and the adapter learns through the middle's response to it (its Jacobian). Both middles get the
same random perturbation of their input (``perturbation`` × each token's RMS, Gaussian) and the
student's response (perturbed exit − clean exit) is pulled to the teacher's, by normalised MSE —
a finite-difference Jacobian match on the data manifold. It costs a second forward of each
model per step (the language-model head is skipped for it).

With ``gradient_weight`` > 0 a third term aligns what the bottom adapter actually receives in
backward: the gradient of the LM loss at the middle's input. The teacher's backward gives the
signal arriving at the middle's exit (v = ∂L/∂exit, through the top blocks and head) and at its
input (u = ∂L/∂entry = J_fullᵀ v); the student's middle is asked for Jᵀ v with the *same* v
(a vector-Jacobian product, differentiated again to train it), pulled to u by normalised MSE.
Where the Jacobian term probes random directions, this one probes the direction the adapter's
loss pushes, exactly; it costs a backward of the teacher and a double backward of the student's
middle per step. ``lm_weight`` scales the LM loss (0: the student only matches the full middle's
output and gradients and is not trained to be a better language model by itself).

Progress bar over steps; the student with the best held-out public-text perplexity is kept; a
checkpoint (safetensors weights + JSON step) lets an interrupted run resume (optimizer moments
restart: we never unpickle, even our own files).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from emulator.arch import ArchSpec, block_list, hf_model
from emulator.batches import Batch, text_batches
from emulator.forward import autocast
from emulator.layers import LayerPlan
from emulator.tokenizers import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class DistillResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    nmse: list[float] = field(default_factory=list)
    jacobian: list[float] = field(default_factory=list)  # NMSE of the middle's response
    gradient: list[float] = field(default_factory=list)  # NMSE of the gradient at its input
    evaluations: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out ppl)
    best_step: int = 0
    best_perplexity: float = math.inf
    seconds: float = 0.0  # training time, including earlier runs resumed from

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "final_loss": self.losses[-1] if self.losses else None,
            "final_nmse": self.nmse[-1] if self.nmse else None,
            "final_jacobian_nmse": self.jacobian[-1] if self.jacobian else None,
            "final_gradient_nmse": self.gradient[-1] if self.gradient else None,
            "evaluations": self.evaluations,
            "best_step": self.best_step,
            "best_perplexity": self.best_perplexity,
            "seconds": round(self.seconds, 1),
        }


def _hidden(model: nn.Module, batch: Batch, index: int) -> tuple[torch.Tensor, Any]:
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0),
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[index], out


class _InputShift:
    """Adds ``delta`` to the hidden state entering one block while active (a forward pre-hook):
    the same perturbation of the middle's input for teacher and student."""

    def __init__(self, block: nn.Module) -> None:
        self.delta: torch.Tensor | None = None
        self._handle = block.register_forward_pre_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.delta is None:
            return None
        if args:
            return (args[0] + self.delta.to(args[0].dtype), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] + self.delta
        return args, kwargs


class _EntryLeaf:
    """While active, the hidden state entering one block becomes a fresh leaf that requires
    grad (a forward pre-hook), so the gradient arriving at the middle's input can be taken."""

    def __init__(self, block: nn.Module) -> None:
        self.active = False
        self.leaf: torch.Tensor | None = None
        self._handle = block.register_forward_pre_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.active:
            return None
        if args:
            self.leaf = args[0].detach().requires_grad_(True)
            return (self.leaf, *args[1:]), kwargs
        self.leaf = kwargs["hidden_states"].detach().requires_grad_(True)
        kwargs["hidden_states"] = self.leaf
        return args, kwargs


def _twice_differentiable(needed: bool) -> AbstractContextManager[object]:
    """Attention on PyTorch's math kernel when the student's backward is differentiated again
    (the gradient term): the fused CPU/CUDA attention kernels have no double backward."""
    if not needed:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _teacher_signals(
    full_model: nn.Module,
    batch: Batch,
    entry: _EntryLeaf,
    exit_index: int,
    precision: str,
    device: torch.device,
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """The teacher's exit hidden state and outputs, and its LM loss's gradients at the middle's
    exit (v) and input (u = J_fullᵀ v), for the gradient term. Both are scaled by one factor
    that gives v unit RMS (Jᵀv is linear in v): a token-averaged loss's gradients shrink with
    the tokens in a batch, and the term's normalised MSE must not meet its floor."""
    entry.active, entry.leaf = True, None
    try:
        with torch.enable_grad(), autocast(precision, device):
            target, out = _hidden(full_model, batch, exit_index)
            loss = _lm_loss(out.logits, batch)
        if entry.leaf is None:
            raise RuntimeError("the middle's first block was not run: no gradient term")
        v, u = torch.autograd.grad(loss, [target, entry.leaf])
    finally:
        entry.active = False
    scale = v.float().pow(2).mean().sqrt().clamp(min=1e-30).reciprocal()
    return target.detach(), out, (v * scale).detach(), (u * scale).detach()


@contextmanager
def _shifted(shifts: Sequence[_InputShift], delta: torch.Tensor) -> Iterator[None]:
    """Both middles' inputs moved by ``delta`` inside the block, and back afterwards."""
    for shift in shifts:
        shift.delta = delta
    try:
        yield
    finally:
        for shift in shifts:
            shift.delta = None


def _input_noise(
    entry: torch.Tensor, perturbation: float, generator: torch.Generator
) -> torch.Tensor:
    """Gaussian noise of ``perturbation`` × each token's RMS of the middle's input ``entry``."""
    rms = entry.float().pow(2).mean(-1, keepdim=True).sqrt()
    return torch.randn(entry.shape, generator=generator).to(entry.device) * perturbation * rms


def _decoder_states(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
    """Every block's input and the last output, from the decoder alone (no language-model
    head: the Jacobian term needs hidden states only)."""
    out = hf_model(model).base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0),
        output_hidden_states=True,
        use_cache=False,
    )
    return tuple(out.hidden_states)


def _masked_nmse(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    diff = ((prediction.float() - target.float()) ** 2 * mask).sum()
    return diff / ((target.float() ** 2) * mask).sum().clamp(min=1e-6)


@torch.no_grad()
def middle_response_error(
    full_model: nn.Module,
    student: nn.Module,
    plan: LayerPlan,
    arch: ArchSpec,
    batches: Sequence[Batch],
    perturbation: float = 0.1,
    seed: int = 0,
) -> float:
    """How differently the emulator's middle responds to a perturbation of its input than the
    full middle does: NMSE of (perturbed − clean exit) over ``batches``, 0 for an identical
    middle. What the Jacobian term of ``distill`` lowers."""
    bottom = len(plan.bottom)
    teacher_exit, student_exit = plan.num_layers - len(plan.top), bottom + len(plan.middle_kept)
    shifts = (
        _InputShift(block_list(full_model, arch)[bottom]),
        _InputShift(block_list(student, arch)[bottom]),
    )
    generator = torch.Generator().manual_seed(seed)
    num, den = 0.0, 0.0
    try:
        for batch in batches:
            states = _decoder_states(full_model, batch)
            clean_full = states[teacher_exit].float()
            clean = _decoder_states(student, batch)[student_exit].float()
            with _shifted(shifts, _input_noise(states[bottom], perturbation, generator)):
                moved_full = _decoder_states(full_model, batch)[teacher_exit].float() - clean_full
                moved = _decoder_states(student, batch)[student_exit].float() - clean
            mask = batch.attention_mask.unsqueeze(-1).float()
            num += float(((moved - moved_full) ** 2 * mask).sum())
            den += float((moved_full**2 * mask).sum())
    finally:
        for shift in shifts:
            shift.remove()
    return num / max(den, 1e-12)


def middle_gradient_error(
    full_model: nn.Module,
    student: nn.Module,
    plan: LayerPlan,
    arch: ArchSpec,
    batches: Sequence[Batch],
) -> float:
    """How differently the emulator's middle passes the LM loss's gradient back to its input
    than the full middle does: NMSE of Jᵀ v (v = the full model's gradient at the middle's exit)
    against the full model's gradient at the middle's input, over ``batches``; 0 for an
    identical middle. What the gradient term of ``distill`` lowers."""
    bottom = len(plan.bottom)
    teacher_exit, student_exit = plan.num_layers - len(plan.top), bottom + len(plan.middle_kept)
    entries = (
        _EntryLeaf(block_list(full_model, arch)[bottom]),
        _EntryLeaf(block_list(student, arch)[bottom]),
    )
    device = next(student.parameters()).device
    num, den = 0.0, 0.0
    try:
        for batch in batches:
            _, _, v, u = _teacher_signals(
                full_model, batch, entries[0], teacher_exit, "fp32", device
            )
            entries[1].active, entries[1].leaf = True, None
            with torch.enable_grad():
                hidden, _ = _hidden(student, batch, student_exit)  # one backward: any kernel
            entries[1].active = False
            assert entries[1].leaf is not None
            (own,) = torch.autograd.grad(hidden, entries[1].leaf, grad_outputs=v)
            mask = batch.attention_mask.unsqueeze(-1).float()
            num += float(((own.float() - u.float()) ** 2 * mask).sum())
            den += float((u.float() ** 2 * mask).sum())
    finally:
        for entry in entries:
            entry.remove()
    return num / max(den, 1e-30)


def _lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    targets = batch.labels[:, 1:]
    return nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


@torch.no_grad()
def held_out_perplexity(model: nn.Module, batches: Sequence[Batch], device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        tokens = int((batch.labels[:, 1:] != -100).sum())
        total += float(_lm_loss(out.logits, batch)) * tokens
        count += tokens
    return math.exp(total / max(count, 1))


def distill(
    full_model: nn.Module,
    student: nn.Module,
    plan: LayerPlan,
    arch: ArchSpec,
    tokenizer: Tokenizer,
    train_texts: Sequence[str],
    held_out_texts: Sequence[str],
    *,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 8,
    max_length: int = 128,
    mse_weight: float = 30.0,
    precision: str = "fp32",
    device: torch.device | None = None,
    eval_every: int = 50,
    jacobian_weight: float = 0.0,
    perturbation: float = 0.1,
    gradient_weight: float = 0.0,
    lm_weight: float = 1.0,
    select_best: bool = True,
    checkpoint: Path | None = None,
    checkpoint_key: str = "",
    seed: int = 0,
) -> DistillResult:
    """Train ``student``'s middle blocks in place; leaves the best held-out student in it
    (``select_best=False``: the last one)."""
    device = device or torch.device("cpu")
    bottom, kept = len(plan.bottom), len(plan.middle_kept)
    teacher_exit = plan.num_layers - len(plan.top)  # hidden state entering the top blocks
    student_exit = bottom + kept
    middle = list(block_list(student, arch))[bottom:student_exit]
    for p in student.parameters():
        p.requires_grad_(False)
    params = [p for block in middle for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    full_model.to(device).eval()
    teacher_flags = {p: p.requires_grad for p in full_model.parameters()}
    full_model.requires_grad_(False)  # its backward (gradient term) needs no weight gradients
    student.to(device)
    train = text_batches(tokenizer, train_texts, max_length, batch_size)
    held = text_batches(tokenizer, held_out_texts, max_length, batch_size)
    if not train or not held:
        raise ValueError("distillation needs non-empty training and held-out texts")

    result = DistillResult(steps=steps)
    start = 0
    if _resumable(checkpoint, checkpoint_key):
        assert checkpoint is not None
        student.load_state_dict(load_file(str(checkpoint / "student.safetensors")), strict=False)
        state = json.loads((checkpoint / "state.json").read_text())
        result.seconds = float(state.get("seconds", 0.0))
        start, result.best_step, result.best_perplexity = (
            int(state["step"]),
            int(state["best_step"]),
            float(state["best_perplexity"]),
        )
        log.info("resuming distillation at step %d", start)
    best = {k: v.detach().clone() for k, v in _middle_state(student, arch, bottom, kept).items()}
    if start and checkpoint is not None and (checkpoint / "best.safetensors").is_file():
        best = load_file(str(checkpoint / "best.safetensors"))
    if start == 0:
        result.best_perplexity = held_out_perplexity(student, held, device)
        result.evaluations.append((0, result.best_perplexity))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    began = time.perf_counter() - result.seconds
    shifts = (
        (_InputShift(block_list(full_model, arch)[bottom]), _InputShift(middle[0]))
        if jacobian_weight > 0 and kept
        else None
    )
    entries = (
        (_EntryLeaf(block_list(full_model, arch)[bottom]), _EntryLeaf(middle[0]))
        if gradient_weight > 0 and kept
        else None
    )
    bar = tqdm(range(start, steps), desc="distilling emulator", unit="step", dynamic_ncols=True)
    try:
        for step in bar:
            batch = train[int(torch.randint(len(train), (1,), generator=generator))].to(device)
            if entries is None:
                with torch.no_grad(), autocast(precision, device):
                    target, teacher_out = _hidden(full_model, batch, teacher_exit)
            else:
                target, teacher_out, v, u = _teacher_signals(
                    full_model, batch, entries[0], teacher_exit, precision, device
                )
                entries[1].active, entries[1].leaf = True, None
            student.train()
            try:
                with autocast(precision, device), _twice_differentiable(entries is not None):
                    hidden, out = _hidden(student, batch, student_exit)
            finally:
                if entries is not None:
                    entries[1].active = False
            with autocast(precision, device):
                mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
                nmse = _masked_nmse(hidden, target, mask)
                loss = lm_weight * _lm_loss(out.logits, batch) + mse_weight * nmse
            if entries is not None:
                assert entries[1].leaf is not None
                (own,) = torch.autograd.grad(
                    hidden, entries[1].leaf, grad_outputs=v.to(hidden.dtype), create_graph=True
                )
                alignment = _masked_nmse(own, u, mask)
                loss = loss + gradient_weight * alignment
                result.gradient.append(float(alignment.detach()))
            if shifts is not None:
                entry = teacher_out.hidden_states[bottom].detach()
                with _shifted(shifts, _input_noise(entry, perturbation, generator)):
                    with torch.no_grad(), autocast(precision, device):
                        target_moved = _decoder_states(full_model, batch)[teacher_exit]
                    with autocast(precision, device):
                        moved = _decoder_states(student, batch)[student_exit]
                        response = _masked_nmse(moved - hidden, target_moved - target, mask)
                loss = loss + jacobian_weight * response
                result.jacobian.append(float(response.detach()))
            loss.backward(inputs=params)  # not into the entry leaf of the gradient term
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(float(loss.detach()))
            result.nmse.append(float(nmse.detach()))
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}", nmse=f"{result.nmse[-1]:.4f}")
            done = step + 1
            if done % eval_every == 0 or done == steps:
                perplexity = held_out_perplexity(student, held, device)
                result.evaluations.append((done, perplexity))
                if perplexity < result.best_perplexity:
                    result.best_perplexity, result.best_step = perplexity, done
                    best = {
                        k: v.detach().clone()
                        for k, v in _middle_state(student, arch, bottom, kept).items()
                    }
                result.seconds = time.perf_counter() - began
                if checkpoint is not None:
                    _save_checkpoint(checkpoint, checkpoint_key, student, best, done, result)
    finally:
        for shift in shifts or ():
            shift.remove()
        for entry in entries or ():
            entry.remove()
        for param, flag in teacher_flags.items():
            param.requires_grad_(flag)
    bar.close()
    if select_best:
        student.load_state_dict(best, strict=False)
    for p in student.parameters():
        p.requires_grad_(False)
    return result


def _middle_state(
    student: nn.Module, arch: ArchSpec, bottom: int, kept: int
) -> dict[str, torch.Tensor]:
    from emulator.arch import block_prefix

    prefix = block_prefix(student, arch)
    wanted = tuple(f"{prefix}.{i}." for i in range(bottom, bottom + kept))
    return {k: v for k, v in student.state_dict().items() if k.startswith(wanted)}


def _resumable(checkpoint: Path | None, key: str) -> bool:
    """A checkpoint exists and was written for the same teacher, plan and recipe."""
    if checkpoint is None or not (checkpoint / "student.safetensors").is_file():
        return False
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if state.get("key", "") != key:
        log.warning("ignoring distillation checkpoint %s: made for another setup", checkpoint)
        return False
    return True


def _save_checkpoint(
    folder: Path,
    key: str,
    student: nn.Module,
    best: dict[str, torch.Tensor],
    step: int,
    result: DistillResult,
) -> None:
    """Current and best weights (safetensors, tied aliases dropped), then the step; each file
    replaced atomically, the step last, so a resume never pairs a step with older weights."""
    from emulator.split import unique_state

    folder.mkdir(parents=True, exist_ok=True)
    current = {k: v.detach().contiguous().cpu() for k, v in unique_state(student).items()}
    for name, tensors in (
        ("best", {k: v.contiguous().cpu() for k, v in best.items()}),
        ("student", current),
    ):
        save_file(tensors, str(folder / f"{name}.safetensors.tmp"))
        (folder / f"{name}.safetensors.tmp").replace(folder / f"{name}.safetensors")
    state = {
        "key": key,
        "step": step,
        "best_step": result.best_step,
        "best_perplexity": result.best_perplexity,
        "seconds": result.seconds,
    }
    (folder / "state.json.tmp").write_text(json.dumps(state))
    (folder / "state.json.tmp").replace(folder / "state.json")
