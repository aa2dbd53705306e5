"""AdamW for adapter training: torch's single-tensor AdamW update, without ``torch.optim``.

Every ``torch.optim`` optimizer imports ``torch._dynamo`` when it is built (its methods are
wrapped to keep the compiler out, and the wrapper imports the compiler to say so): ~70 MB
resident with sympy, more than a 2-6-2 SmolLM2 emulator's trainable tensors, their gradients and
their optimizer state together. The client's lean runtime (``client.runtime``) exists to leave
such weight out, so local training steps with this class instead. The update is
``torch.optim.AdamW``'s default CPU path (``foreach=False``) op for op, so the numbers are the
same bits (tested); there is no AMSGrad, maximise or capturable variant, and no state dict:
a client's optimizer lives for one round.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class AdamW:
    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}")
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.steps = 0
        self._avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self._avg_sq = [
            torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params
        ]

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1**self.steps)
        correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        for param, avg, avg_sq in zip(self.params, self._avg, self._avg_sq, strict=True):
            grad = param.grad
            if grad is None:
                continue
            if self.weight_decay != 0:
                param.mul_(1 - self.lr * self.weight_decay)
            avg.lerp_(grad, 1 - beta1)
            avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (avg_sq.sqrt() / correction2_sqrt).add_(self.eps)
            param.addcdiv_(avg, denom, value=-step_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()
