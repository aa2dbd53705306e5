"""Frozen tensors shared by a host's workers (``client.shared_frozen``): the same numbers as a
worker's own copy, one file whatever the number of workers, and never a file that differs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from client.kernels.linear import PackedLinear
from client.session import load_client_tokenizer, load_for_training
from client.shared_frozen import frozen_folder, share_frozen
from emulator.adapter import AdapterSpec
from emulator.arch import arch_spec
from emulator.build import build_bundle
from emulator.bundle import Bundle, verify_bundle
from emulator.examples import training_batches
from emulator.forward import answer_loss, autocast
from emulator.layers import plan_layers
from offsite.config import EmulatorConfig
from offsite.data import Example
from tests.conftest import LABELS, tiny_model, tiny_texts, write_public_text


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Bundle:
    """A tiny llama's 1-2-1 int8 bundle (its middle on the packed kernels once loaded)."""
    root = tmp_path_factory.mktemp("shared-frozen")
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets, tuple(plan.top))
    settings = EmulatorConfig(
        public_text=str(write_public_text(root)),
        public_examples=4,
        calibration_examples=8,
        quantize="int8",
        quant_group_size=16,
    )
    built = build_bundle(
        full, tokenizer, arch, plan, spec, root / "b", source="t", settings=settings
    )
    return verify_bundle(built.path)


@pytest.fixture(autouse=True)
def _own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFSITE_FROZEN", str(tmp_path / "frozen"))


def _step(bundle: Bundle, share: bool, precision: str = "fp32"):
    """Loss, LoRA gradients and the model of one training step on a fresh load."""
    adapted, _ = load_for_training(bundle, precision)
    shared = (
        share_frozen(adapted.model, f"{bundle.digest}|{precision}", min_bytes=0) if share else 0
    )
    tokenizer = load_client_tokenizer(bundle)
    examples = [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 4)]
    batch = next(
        training_batches(
            tokenizer, examples, "{text}\nTopic:", max_words=8, max_length=40, batch_size=6, seed=0
        )
    )
    adapted.model.train()
    with autocast(precision, torch.device("cpu")):
        loss = answer_loss(adapted.model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in adapted.model.named_parameters() if p.requires_grad}
    return loss, grads, adapted, shared


def _mappings(path: Path) -> list[tuple[int, int]]:
    """This process's address ranges that map ``path`` (``/proc/self/maps``)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        **{n: p for n, p in model.named_parameters() if not p.requires_grad},
        **dict(model.named_buffers()),
    }


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_workers_share_one_file_and_train_the_same_bits(
    int8_bundle: Bundle, precision: str
) -> None:
    """Two loads (two workers) map the same file, and a step on the shared tensors is the same
    bits as on a worker's own copy (loss and every gradient)."""
    loss, grads, own, _ = _step(int8_bundle, share=False, precision=precision)
    assert any(isinstance(m, PackedLinear) for m in own.model.modules())
    results = [_step(int8_bundle, share=True, precision=precision) for _ in range(2)]
    files = list(frozen_folder().glob("*.safetensors"))
    assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o400"
    for shared_loss, shared_grads, adapted, shared in results:
        assert shared > 0
        assert torch.equal(shared_loss, loss)
        assert shared_grads.keys() == grads.keys()
        assert all(torch.equal(shared_grads[n], g) for n, g in grads.items())
        assert not any(t.requires_grad for t in _frozen(adapted.model).values())
    # a tied head stays tied: one tensor of the file, not two copies
    for _, _, adapted, _ in results:
        tied = [
            t.data_ptr()
            for n, t in adapted.model.named_parameters(remove_duplicate=False)
            if n.endswith(("embed_tokens.weight", "lm_head.weight"))
        ]
        assert len(tied) == 2 and len(set(tied)) == 1, tied
    # every frozen tensor of both workers lies in a mapping of that file, none in the heap
    mapped = _mappings(files[0])
    assert mapped
    for _, _, adapted, _ in results:
        inside = [
            t
            for t in _frozen(adapted.model).values()
            if any(lo <= t.data_ptr() < hi for lo, hi in mapped)
        ]
        assert inside  # the kernels need aligned weights: only aligned tensors are swapped in
        assert all(t.data_ptr() % 64 == 0 for t in inside)


def test_a_file_that_differs_is_written_again_never_used(int8_bundle: Bundle) -> None:
    loss, _, _, _ = _step(int8_bundle, share=True)
    (path,) = frozen_folder().glob("*.safetensors")
    from safetensors.torch import load_file, save_file

    tampered = {n: torch.zeros_like(t) for n, t in load_file(path).items()}
    os.chmod(path, 0o600)
    save_file(tampered, path)  # same names and shapes, other values
    again, _, _, shared = _step(int8_bundle, share=True)
    assert shared > 0 and torch.equal(again, loss)
    assert any(t.abs().sum() > 0 for t in load_file(path).values())
    os.chmod(path, 0o600)
    path.write_bytes(b"\xff" * 64)  # not even a safetensors file
    again, _, _, shared = _step(int8_bundle, share=True)
    assert shared > 0 and torch.equal(again, loss)


def test_a_folder_others_can_write_is_not_used(int8_bundle: Bundle) -> None:
    frozen_folder().mkdir(parents=True)
    os.chmod(frozen_folder(), 0o777)
    loss, _, _, shared = _step(int8_bundle, share=True)
    own, _, _, _ = _step(int8_bundle, share=False)
    assert shared == 0 and not list(frozen_folder().iterdir())
    assert torch.equal(loss, own)


def test_new_base_weights_change_the_worker_never_the_file(int8_bundle: Bundle) -> None:
    """merge-exact writes a round's LoRA base weights into the frozen linears: into the
    worker's private pages, never into the file the other workers map."""
    _, _, adapted, _ = _step(int8_bundle, share=True)
    (path,) = frozen_folder().glob("*.safetensors")
    before = path.read_bytes()
    bases = {k: torch.ones_like(v) for k, v in adapted.lora_base_state().items()}
    assert bases
    adapted.load_trainable({**bases, **adapted.trainable_state()})
    assert all(torch.equal(v, bases[k]) for k, v in adapted.lora_base_state().items())
    assert path.read_bytes() == before


def _worker(bundle_path: str, start: object, out: object) -> None:
    """A simulation worker's load: open the bundle, share its frozen tensors, report the
    inodes of the frozen-cache files it maps and the bytes it shares."""
    start.wait()  # type: ignore[attr-defined]  # a multiprocessing barrier
    bundle = verify_bundle(bundle_path)
    adapted, _ = load_for_training(bundle, "fp32")
    shared = share_frozen(adapted.model, f"{bundle.digest}|fp32", min_bytes=0)
    folder = str(frozen_folder())
    inodes = {
        int(line.split()[4])
        for line in Path("/proc/self/maps").read_text().splitlines()
        if folder in line
    }
    out.put((shared, sorted(inodes)))  # type: ignore[attr-defined]  # a multiprocessing queue


def test_workers_loading_at_once_map_one_and_the_same_file(int8_bundle: Bundle) -> None:
    """Three processes that load together (round 1 of a simulation) take turns: one writes,
    all three map that same file, and no temporary file is left."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start, out = context.Barrier(3), context.Queue()
    workers = [
        context.Process(target=_worker, args=(str(int8_bundle.path), start, out)) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    (path,) = frozen_folder().glob("*.safetensors")
    assert all(shared > 0 for shared, _ in results)
    assert all(inodes == [path.stat().st_ino] for _, inodes in results), results
    assert not list(frozen_folder().glob(".frozen-*"))


def test_sharing_can_be_turned_off_and_a_file_not_wholly_ours_is_not_used(
    int8_bundle: Bundle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    loss, _, _, _ = _step(int8_bundle, share=True)
    (path,) = frozen_folder().glob("*.safetensors")
    inode = path.stat().st_ino
    path.chmod(0o440)  # readable by the group: another user could have planted it
    again, _, _, shared = _step(int8_bundle, share=True)
    assert shared > 0 and torch.equal(again, loss) and path.stat().st_ino != inode
    planted = tmp_path / "elsewhere.safetensors"
    planted.write_bytes(path.read_bytes())
    path.chmod(0o600)
    path.unlink()
    path.symlink_to(planted)  # a link is never followed: the file is written again
    _, _, _, shared = _step(int8_bundle, share=True)
    assert shared > 0 and not path.is_symlink()
    monkeypatch.setenv("OFFSITE_FROZEN", "off")
    _, _, _, shared = _step(int8_bundle, share=True)
    assert shared == 0
