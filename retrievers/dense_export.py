"""Write a tuned dense retriever as folders other tools load, and the toolkit's `dense_run.json` beside them.

* `full`, `bitfit`: `RUN/model/` is a sentence-transformers folder (`SentenceTransformer("RUN/model")`).
* `lora`: `RUN/model/` is the sentence-transformers folder with the LoRA update merged into the weights, and
  `RUN/adapter/` the PEFT adapter itself (`adapter_config.json`, `adapter_model.safetensors`), loadable with
  `peft.PeftModel.from_pretrained(base, "RUN/adapter")` onto the base encoder's transformer. The adapter is not
  put at the top of the sentence-transformers folder because that route goes through transformers' PEFT
  integration, which (transformers 5.24) demands peft >= 0.22, a version PyPI does not have yet.
* `iaa`, `adapter`, `prefix`: the toolkit's `peft/` folder (method config + trained tensors). A plain
  sentence-transformers folder is not possible for them: their modules are not sentence-transformers' own, and
  sentence-transformers >= 6 imports any other module class only with `trust_remote_code=True`, which the
  toolkit never sets by default; IAA's bottleneck is non-linear, so it cannot be merged into the weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from core.io import atomic_dir, read_json, write_json

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
RUN_FORMAT_VERSION = 2
EXPORTED = ("full", "bitfit", "lora")


def save_dense_run(st: Any, config: Any, out: Path, base_fingerprint: list[float]) -> None:
    """The tuned model (see the module doc) and `dense_run.json`, which the toolkit's loaders read first."""
    from core.models import resolve_model
    from core.peft import peft_config, save_peft
    from core.peft.export import merged_lora_copy, save_lora_adapter
    from core.peft.wrapping import inner_model
    from retrievers.dense_run import PEFT_DIR, RUN_META

    model_dir = None
    # A resumed run replaces the folders its own dense_run.json named (they carry no toolkit marker).
    old = read_json(out / RUN_META) if (out / RUN_META).is_file() else {}
    (out / RUN_META).unlink(missing_ok=True)  # written again last: a folder without it is not a finished run
    if config.peft in EXPORTED:
        with atomic_dir(out / MODEL_DIR, overwrite=True, owned=old.get("model") == MODEL_DIR) as tmp:
            (merged_lora_copy(st) if config.peft == "lora" else st).save_pretrained(str(tmp))
        model_dir = MODEL_DIR
        if config.peft == "lora":
            with atomic_dir(out / ADAPTER_DIR, overwrite=True, owned=old.get("peft") == "lora") as tmp:
                save_lora_adapter(inner_model(st), str(Path(resolve_model(config.encoder)).resolve()), tmp)
    else:
        from core.peft.api import method_overrides
        overrides = method_overrides(config)
        save_peft(st, out / PEFT_DIR, config.peft, peft_config(config.peft, **overrides))
    write_json(out / RUN_META, {"format_version": RUN_FORMAT_VERSION, "base_model": config.encoder,
                                "peft": config.peft, "max_seq_length": config.max_seq_length, "moe": None,
                                "base_fingerprint": base_fingerprint, "model": model_dir})
