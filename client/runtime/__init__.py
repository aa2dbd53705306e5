"""The data owner's lean runtime: the emulator's decoder, LoRA and tokenizer without transformers.

A client only trains the emulator of a bundle; it never generates, never loads hub weights and
never needs transformers' general machinery. Importing transformers' Llama modeling pulls in
``torch._dynamo``, sympy and scipy (~150 MB resident on top of torch's ~220 MB), and PEFT and
``AutoTokenizer`` add more: on SmolLM2-135M's 2-6-2 emulator that is more than the training
step's own activations. This package computes the same functions with torch alone, under the
same module and parameter names, so everything keyed by names (bundle tensors, adapter tensors
on the wire, the kernels of ``client.kernels``) works unchanged. Families it does not cover
load through transformers as before (``decoder.lean_config`` says why not).
"""
