"""A few embedding values of a fixed probe text: tells two encoders apart even under one name."""
from __future__ import annotations

from typing import Any

import numpy as np

PROBE_TEXT = "rag-toolkit encoder fingerprint probe: the quick brown fox."


def embedding_fingerprint(model: Any) -> list[float]:
    """The first 8 values of the normalised float32 embedding of PROBE_TEXT under a sentence-transformers model."""
    emb = model.encode([PROBE_TEXT], convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    return [round(float(x), 5) for x in np.asarray(emb, dtype=np.float32)[0][:8]]
