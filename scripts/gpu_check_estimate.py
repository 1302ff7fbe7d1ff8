"""Estimator error against torch.cuda.max_memory_allocated() on a ~0.55B-parameter random Llama.

Usage: python3 scripts/gpu_check_estimate.py OUT.json [BUDGET_S]
Dry run on a CPU (tiny model, live bytes instead of CUDA): GPU_CHECK_DRY_RUN=1.

For every config of the default ladder's walk (bf16, then two in fp32), trains two steps on
CUDA as the Hugging Face Trainer does (forward, backward, clip, AdamW, zero_grad) and compares
the peak allocated bytes above the baseline with the FakeTensor estimate (device "cuda":
foreach AdamW) and the analytic one. Writes one JSON file and prints a table.
"""

# ruff: noqa: INP001, T201, PLC0415

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

CONFIG: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 1536, "intermediate_size": 4096,
    "num_hidden_layers": 16, "num_attention_heads": 12, "num_key_value_heads": 12,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}


DRY_RUN = bool(os.environ.get("GPU_CHECK_DRY_RUN"))
if DRY_RUN:
    CONFIG.update(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)


def measure_cpu(knobs: Any) -> float:  # noqa: ANN401 - Knobs
    """The dry run's measurement: live tensor bytes on the CPU."""
    import torch

    from supervisor._estimate_child import _build_model, _default_dtype
    from supervisor._sim import LiveBytesBudget

    live = LiveBytesBudget(None)
    with live, _default_dtype(torch.bfloat16 if knobs.precision == "bf16" else torch.float32):
        model = _build_model(CONFIG, knobs.to_dict())
        _train(model, knobs, "cpu")
    return live.peak_bytes / 2**20


def _train(model: Any, knobs: Any, device: str) -> None:  # noqa: ANN401
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    for _ in range(2):
        for _ in range(knobs.grad_accum):
            ids = torch.randint(3, CONFIG["vocab_size"], (knobs.per_device_batch,
                                                          knobs.cutoff_len), device=device)
            loss = model(input_ids=ids, labels=ids).loss / knobs.grad_accum
            loss.backward()
            del loss, ids
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure(knobs: Any) -> float:  # noqa: ANN401 - Knobs
    """Peak MiB allocated above the baseline for two real training steps of `knobs` on CUDA."""
    import torch

    from supervisor._estimate_child import _build_model, _default_dtype

    dtype = torch.bfloat16 if knobs.precision == "bf16" else torch.float32
    gc.collect()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with _default_dtype(dtype), torch.device("cuda"):
        model = _build_model(CONFIG, knobs.to_dict())
    _train(model, knobs, "cuda")
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    del model
    return peak


def main() -> int:
    out = Path(sys.argv[1])
    budget_s = float(sys.argv[2]) if len(sys.argv) > 2 else 180.0  # noqa: PLR2004
    started = time.monotonic()
    import torch

    from supervisor.estimate import ModelSpec, analytic, estimate_many
    from supervisor.knobs import Knobs
    from supervisor.plan import walk
    from supervisor.policy import resolve

    spec = ModelSpec.from_config("llama-0.55b", CONFIG, source="scripts/gpu_check_estimate.py")
    start = Knobs(per_device_batch=4, cutoff_len=1024, precision="bf16")
    configs = [k for k, _ in walk(start, resolve("default"))]
    configs += [dataclasses.replace(configs[0], precision="fp32"),
                dataclasses.replace(next(k for k in configs if str(k.finetuning_type) == "lora"),
                                    precision="fp32")]
    # Warm up cuBLAS and the allocator once, so every config's baseline holds the workspace.
    if not DRY_RUN:
        a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
        (a @ a).sum().item()
    t = time.monotonic()
    device = "cpu" if DRY_RUN else "cuda"
    fake = estimate_many(spec, configs, method="fake", device=device, workers=8)
    fake_s = time.monotonic() - t
    rows = []
    device_name = "CPU dry run" if DRY_RUN else torch.cuda.get_device_name()
    print(f"{spec.parameters():,} parameters; {device_name}; fake estimates "
          f"of {len(configs)} configs in {fake_s:.1f} s", flush=True)
    header = (f"{'config':44s} {'measured':>9s} {'fake':>9s} {'err':>6s} {'analytic':>9s} "
              f"{'err':>6s}")
    print(header, flush=True)
    for knobs, predicted in zip(configs, fake, strict=True):
        if time.monotonic() - started > budget_s:
            print("time budget spent; stopping", flush=True)
            break
        measured = measure_cpu(knobs) if DRY_RUN else measure(knobs)
        counted = analytic(spec, knobs, device=device).peak_mib
        name = (f"{knobs.precision} b{knobs.per_device_batch}xGA{knobs.grad_accum} "
                f"L{knobs.cutoff_len} gc={int(knobs.gradient_checkpointing)} "
                f"{knobs.finetuning_type}")
        row = {"config": name, "knobs": knobs.to_dict(), "measured_mib": round(measured, 1),
               "fake_mib": round(predicted.peak_mib, 1),
               "fake_error": round(predicted.peak_mib / measured - 1, 4),
               "analytic_mib": round(counted, 1),
               "analytic_error": round(counted / measured - 1, 4)}
        rows.append(row)
        print(f"{name:44s} {measured:9.0f} {predicted.peak_mib:9.0f} "
              f"{row['fake_error']:+6.1%} {counted:9.0f} {row['analytic_error']:+6.1%}", flush=True)
    record = {"device": device_name, "torch": torch.__version__,
              "params": spec.parameters(), "config": CONFIG, "fake_seconds": round(fake_s, 1),
              "rows": rows}
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
