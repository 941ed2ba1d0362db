"""Model ids on the Hugging Face hub (e.g. `Qwen/Qwen2.5-7B-Instruct`) through `huggingface_hub`.

Only what serving needs is fetched (configs, tokenizer files, safetensors). HF_HOME, HF_HUB_CACHE
and HF_HUB_OFFLINE are honoured by huggingface_hub itself: offline, a model already in the cache
still loads.
"""

from __future__ import annotations

from pathlib import Path

ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "vocab.json", "merges.txt"]


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of `repo_id`, downloaded (or found in the HF cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    local_hint = (
        "pass a local path instead: a Hugging Face model folder with config.json and *.safetensors, "
        "or a .gguf file (e.g. --model /models/Qwen2.5-7B-Instruct)"
    )
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except HFValidationError:
        raise ValueError(f"{repo_id!r} is neither an existing path nor a valid hub model id; {local_hint}") from None
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ValueError(f"hub model {repo_id!r} was not found or needs access rights ({type(e).__name__}); {local_hint}") from None
    except Exception as e:  # unreachable hub, offline mode without a cached copy, HTTP failures
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot get hub model {repo_id!r} from the Hugging Face hub ({reason}); {local_hint}") from None
    return Path(folder)
