"""Distillation brings the emulator's middle closer to the full middle, and ships new bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from emulator.adapter import AdapterSpec
from emulator.arch import arch_spec, block_list
from emulator.build import build_bundle
from emulator.bundle import load_bundle_model, verify_bundle
from emulator.distill import DistillResult, distill
from emulator.layers import plan_layers
from emulator.split import build_emulator
from offsite.config import EmulatorConfig
from offsite.data import Example, write_jsonl
from tests.conftest import LABELS, VOCAB, tiny_model, tiny_texts


def _texts(n: int, seed: int) -> list[str]:
    return [t for lab in LABELS for t in tiny_texts(lab, n, seed=seed)]


def _distill_tiny(*models_plan_arch_tokenizer: Any, **options: Any) -> DistillResult:
    """``distill`` on the tiny texts with the tests' shared recipe, seeded."""
    torch.manual_seed(0)
    return distill(
        *models_plan_arch_tokenizer,
        _texts(20, 1),
        _texts(3, 2),
        lr=3e-3,
        batch_size=8,
        max_length=32,
        **options,
    )


def test_distillation_reduces_student_teacher_mse(tokenizer) -> None:
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 1)
    student = build_emulator(full, plan, arch)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if ".layers.2." not in k}
    result = _distill_tiny(full, student, plan, arch, tokenizer, steps=60, eval_every=20)
    first, last = sum(result.nmse[:5]) / 5, sum(result.nmse[-5:]) / 5
    assert last < first, (first, last)
    assert result.best_perplexity <= result.evaluations[0][1]
    # only the kept middle block (emulator index 1 -> here index 1) trained
    trained = {
        k for k, v in student.state_dict().items() if k in frozen and not torch.equal(v, frozen[k])
    }
    middle = block_list(student, arch)[1]
    assert not trained - {f"model.layers.1.{n}" for n in middle.state_dict()}


def test_distilled_bundle_ships_no_verbatim_middle(tmp_path: Path, tokenizer) -> None:
    public = tmp_path / "public.jsonl"
    write_jsonl([Example("", completion=t) for t in _texts(20, 4)], public)
    full = tiny_model("llama")
    with torch.no_grad():  # distinct norms, as in trained models
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets)
    settings = EmulatorConfig(
        public_text=str(public),
        public_examples=6,
        distill=True,
        distill_steps=10,
        distill_lr=1e-3,
        distill_texts=40,
        distill_max_length=32,
    )
    bundle = build_bundle(
        full, tokenizer, arch, plan, spec, tmp_path / "b", source="t", settings=settings
    )
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    assert manifest["compression"]["distilled"]["steps"] == 10
    assert manifest["privacy"]["middle_tensors_verbatim"] == 0
    emulator = load_bundle_model(verify_bundle(bundle.path, bundle.digest))
    x = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        assert emulator(x).logits.isfinite().all()


def test_distillation_resumes_from_its_checkpoint(tmp_path: Path, tokenizer) -> None:
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 1)
    student = build_emulator(full, plan, arch)
    common = dict(lr=3e-3, batch_size=8, max_length=32, eval_every=5, checkpoint=tmp_path / "ck")
    first = distill(
        full, student, plan, arch, tokenizer, _texts(10, 1), _texts(2, 2), steps=10, **common
    )
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 10
    again = build_emulator(full, plan, arch)
    resumed = distill(
        full, again, plan, arch, tokenizer, _texts(10, 1), _texts(2, 2), steps=15, **common
    )
    assert len(resumed.losses) == 5  # only the 5 missing steps ran
    assert resumed.best_perplexity <= first.best_perplexity


def test_resuming_a_finished_distillation_returns_its_best_student(
    tmp_path: Path, tokenizer
) -> None:
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 1)
    common = dict(lr=0.2, batch_size=8, max_length=32, eval_every=3, checkpoint=tmp_path / "ck")
    student = build_emulator(full, plan, arch)
    first = distill(
        full, student, plan, arch, tokenizer, _texts(10, 1), _texts(2, 2), steps=9, **common
    )
    again = build_emulator(full, plan, arch)
    resumed = distill(
        full, again, plan, arch, tokenizer, _texts(10, 1), _texts(2, 2), steps=9, **common
    )
    assert not resumed.losses  # nothing left to run
    assert resumed.best_step == first.best_step
    middle = block_list(student, arch)[1].state_dict()
    for name, value in block_list(again, arch)[1].state_dict().items():
        assert torch.equal(value, middle[name]), name


def _errors_after_distillation(
    tokenizer, measure: Any, trace: str, runs: dict[Any, dict[str, float]]
) -> dict[Any, float]:
    """Distill a fresh tiny 1-1-1 student once per entry of ``runs`` (``distill`` options) and
    return ``measure``'s error after each; checks that each student starts with an error, that
    the term's trace (``DistillResult.<trace>``) is kept exactly when its weight is set, and
    that no hook is left on either model."""
    from emulator.batches import text_batches

    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 1)
    held = text_batches(tokenizer, _texts(3, 7), 32, 8)
    errors = {}
    for key, options in runs.items():
        student = build_emulator(full, plan, arch)
        assert measure(full, student, plan, arch, held) > 0
        result = _distill_tiny(
            full,
            student,
            plan,
            arch,
            tokenizer,
            steps=80,
            eval_every=40,
            select_best=False,  # a random tiny model's perplexity never improves: keep the last
            **options,
        )
        errors[key] = measure(full, student, plan, arch, held)
        assert bool(getattr(result, trace)) == any(
            v > 0 for k, v in options.items() if k.endswith("_weight") and k != "lm_weight"
        )
        assert all(
            not block._forward_pre_hooks
            for model in (full, student)
            for block in block_list(model, arch)
        )
    return errors


def test_the_jacobian_term_aligns_the_middles_response_to_its_input(tokenizer) -> None:
    """Distillation with the Jacobian term leaves the student's middle responding to a
    perturbation of its input more like the full middle than output matching alone does, and
    leaves no hook behind on either model."""
    from emulator.distill import middle_response_error

    errors = _errors_after_distillation(
        tokenizer,
        middle_response_error,
        "jacobian",
        {0.0: {"jacobian_weight": 0.0}, 30.0: {"jacobian_weight": 30.0}},
    )
    assert errors[30.0] < errors[0.0], errors


def test_the_gradient_term_aligns_what_the_bottom_adapter_receives(tokenizer) -> None:
    """Distillation with the gradient term leaves the student's middle passing the LM loss's
    gradient back to its input more like the full middle than output matching alone does (0 for
    the full middle itself), with or without the LM loss, and leaves no hook behind."""
    from emulator.batches import text_batches
    from emulator.distill import middle_gradient_error

    full = tiny_model("llama")
    arch = arch_spec(full.config)
    held = text_batches(tokenizer, _texts(3, 7), 32, 8)
    whole = plan_layers(6, 1, 1, -1)
    assert middle_gradient_error(full, build_emulator(full, whole, arch), whole, arch, held) < 1e-10
    errors = _errors_after_distillation(
        tokenizer,
        middle_gradient_error,
        "gradient",
        {
            "output only": {"gradient_weight": 0.0},
            "gradient": {"gradient_weight": 30.0},
            "gradient, no LM loss": {"gradient_weight": 30.0, "lm_weight": 0.0},
        },
    )
    assert errors["gradient"] < errors["output only"], errors
    assert errors["gradient, no LM loss"] < errors["output only"], errors
