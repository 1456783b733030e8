"""`tunelab push RUN REPO_ID` and `output.hub_model_id`: upload a model dir (an adapter, a merged model or a GGUF
export) to the Hugging Face Hub with huggingface_hub, token from HF_TOKEN (or `hf auth login`). A dir without a
model card gets one first."""

from __future__ import annotations

from pathlib import Path

from .config import UserError


def model_dir(path: str | Path) -> Path:
    """A run dir -> its final/; a model, adapter or export dir as it is."""
    p = Path(path)
    if (p / "final").is_dir():
        return p / "final"
    if not p.is_dir():
        raise UserError(f"{p}: no such run or model dir")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.gguf")) and not (p / "adapter_config.json").is_file():
        raise UserError(f"{p}: holds no model (no final/, *.safetensors, *.gguf or adapter_config.json)")
    return p


def push(path: str | Path, repo_id: str, private: bool = False, say=print) -> str:
    """Create the repo (if new) and upload the dir; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = model_dir(path)
    if not (folder / "README.md").is_file():
        from .modelcard import run_config, write_model_card

        write_model_card(folder, run_config(folder))
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload from tunelab",
                                   ignore_patterns=["eval.json.tmp", ".*"])
    except HfHubHTTPError as e:
        raise UserError(f"push to {repo_id} failed: {str(e).splitlines()[0]} (set HF_TOKEN to a write token)") from None
    url = getattr(commit, "commit_url", None) or str(commit)
    say(f"pushed {folder} to https://huggingface.co/{repo_id}")
    return url
