"""Draft-model backends behind one ``Drafter`` interface (one file per backend), and the loader that
prepares the draft model and opens it on the best device that works, falling back with reasons."""

from __future__ import annotations

from typing import Any

from specd.desktop.drafters.base import BACKENDS, Drafter, DraftProposal
from specd.desktop.drafters.devices import (
    DEFAULT_CATALOG,
    DeviceChoice,
    DeviceRow,
    Fallback,
    plan_devices,
    probe_devices,
)
from specd.shared.config import Config
from specd.shared.errors import DeviceError, SpecdError
from specd.shared.models import Progress

__all__ = ["BACKENDS", "DraftProposal", "Drafter", "load_drafter", "open_drafter"]

# NPU drafts are compiled for a bounded prompt (static shapes).
NPU_MAX_PROMPT = 1024


def load_drafter(config: Config | None = None, device: str | None = None, progress: Progress | None = None, *,
                 catalog: Any = DEFAULT_CATALOG,
                 rows: list[DeviceRow] | None = None) -> tuple[Drafter, DeviceChoice]:
    """Prepare the configured draft model and open it on the best device that can run it.

    ``device`` overrides ``[devices] edge_device``: "auto", "npu", "gpu", "cpu" or a row id from
    ``specd devices`` (e.g. "openvino:CPU"). Devices that fail are skipped with their reason recorded
    in the returned :class:`DeviceChoice`; :class:`DeviceError` lists every reason when none works.
    """
    config = config or Config()
    say = progress or (lambda _msg: None)
    if catalog is DEFAULT_CATALOG:
        from specd.desktop.drafters.winml import default_catalog

        catalog, _why = default_catalog()
    rows = rows if rows is not None else probe_devices(config, catalog=catalog)
    plan = plan_devices(rows, config, device)
    fallbacks = list(plan.fallbacks)
    for fallback in fallbacks:
        say(f"Cannot use {fallback.device}: {fallback.reason}")
    for row in plan.candidates:
        try:
            drafter = open_drafter(row, config, say, catalog=catalog)
            _smoke_test(drafter)
        except (SpecdError, ImportError, RuntimeError, OSError, MemoryError) as exc:
            fallbacks.append(Fallback(row.id, str(exc)))
            say(f"{row.id} cannot run the draft ({exc}); trying the next device")
            continue
        return drafter, DeviceChoice(row, plan.requested, tuple(fallbacks))
    reasons = "\n".join(f"- {f.device}: {f.reason}" for f in fallbacks) or "- no device is usable"
    raise DeviceError(f"no device can run the draft model {config.models.draft!r}:\n{reasons}")


def _smoke_test(drafter: Drafter) -> None:
    """One forward pass, so a device that compiles the model but cannot run it fails here, not mid-answer."""
    try:
        drafter.append([0])
        drafter.next_logits()
        drafter.rollback(0)
    except BaseException:
        drafter.close()
        raise


def open_drafter(row: DeviceRow, config: Config, progress: Progress | None = None, *,
                 catalog: Any = None) -> Drafter:
    """Prepare the draft model for ``row``'s backend (built and cached on first use, at the precision
    :func:`~specd.desktop.precision.choice.pick_precision` gives) and open it there."""
    from specd.desktop.precision.choice import pick_precision

    say = progress or (lambda _msg: None)
    pick = pick_precision(row, config, say)
    drafter = _open_at(row, config, pick.precision, say, catalog)
    drafter.precision, drafter.precision_reason = pick.precision, pick.reason
    return drafter


def _open_at(row: DeviceRow, config: Config, precision: str, say: Progress, catalog: Any) -> Drafter:
    from specd.desktop.drafters.convert import prepare_draft
    from specd.desktop.precision.choice import draft_spec

    models = config.models
    spec = draft_spec(row, config)
    prepare = dict(cache_override=models.cache_dir, progress=say)
    if row.backend == "torch":
        from specd.desktop.drafters.torch_drafter import TorchDrafter

        return TorchDrafter(prepare_draft(spec, "torch", "fp32", **prepare), row.device, model_name=spec)
    if row.backend == "onnxruntime-genai":
        from specd.desktop.drafters.ortgenai import OrtGenAIDrafter, import_genai, is_genai_folder

        provider, options, builder_ep = "cpu", {}, "cpu"
        if row.device != "cpu":
            from specd.desktop.drafters.winml import KNOWN_PROVIDERS, register_provider

            known = KNOWN_PROVIDERS[row.device]
            if known.builder_ep is None and not is_genai_folder(spec):
                raise DeviceError(f"{row.name} needs a draft model prepared for it: set [devices.npu] model_path "
                                  "to an ONNX Runtime GenAI folder built for that NPU")
            if catalog is None:
                raise DeviceError(f"{row.name} needs the Windows ML catalog, which is not available here")
            register_provider(catalog, row.device, import_genai())
            provider, options, builder_ep = known.genai_name, dict(known.options), known.builder_ep or "cpu"
        folder = prepare_draft(spec, row.backend, precision, execution_provider=builder_ep, **prepare)
        return OrtGenAIDrafter(folder, provider, max_length=config.limits.max_total_tokens,
                               provider_options=options, model_name=spec)
    if row.backend == "openvino":
        from specd.desktop.drafters.openvino import OpenVINODrafter

        folder = prepare_draft(spec, row.backend, precision, **prepare)
        return OpenVINODrafter(folder, row.device, max_prompt=min(NPU_MAX_PROMPT, config.limits.max_input_tokens),
                               min_response=config.sampling.max_new_tokens, model_name=spec)
    raise DeviceError(f"unknown draft backend {row.backend!r}")
