"""Prompt + response tokenization with prompt tokens masked out of the loss.

Truncation policy (when prompt + response exceed `max_length`): the response is cut first (its end
is dropped, keeping at least `min_response_tokens`), then the prompt keeps its *end* (the most
recent turns and the generation prompt survive). `encode_response` reports whether it truncated.
A row whose prompt alone fills `max_length` has no room for a response token after it
(`has_room_for_response`): the data modules drop it as `no_response_tokens` (a policy drop, like
`too_long`) rather than train on one response token after a cut prompt, so with their
`min_response_tokens=1` only the response is ever cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from datamodules.chat import Prompt
from datamodules.templates import render_prompt, response_eos

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""The label of positions no loss is taken on (prompt, padding); the one definition, also used by the models."""
PAIR_SIDES = ("chosen", "rejected")
NO_RESPONSE_TOKENS = "no_response_tokens"
"""The drop reason of a row whose prompt leaves no room for a response token within max_length."""


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, template: str = "auto",
                  insert_eos: bool = False) -> list[int]:
    """Render `prompt` in `template` (`datamodules.templates.render_prompt`) and tokenize it (`encode_prompt_text`)."""
    return encode_prompt_text(tokenizer, render_prompt(prompt, template=template, tokenizer=tokenizer,
                                                       insert_eos=insert_eos))


def adds_special_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether a rendered prompt is tokenized with the tokenizer's special tokens (e.g. its BOS).

    Yes, unless the text already begins with the BOS token: a chat template that writes `{{ bos_token }}`
    itself (Llama-3-Instruct, Mistral-Instruct, Gemma) would otherwise get a second BOS from the tokenizer.
    Then no special tokens are added, exactly as `tokenizer.apply_chat_template(..., tokenize=True)` does.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return not (isinstance(bos, str) and bos and text.startswith(bos))


def encode_prompt_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a rendered prompt: special tokens as the tokenizer adds them, except a BOS the text already
    has (`adds_special_tokens`)."""
    return tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer, text))["input_ids"]


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], **kwargs: Any):
    """`encode_prompt_text` for a batch (generation): `tokenizer(texts, **kwargs)`, e.g. padding=True,
    return_tensors="pt", with special tokens added as `adds_special_tokens` says for each text."""
    flags = {adds_special_tokens(tokenizer, text) for text in texts}
    if len(flags) <= 1:
        return tokenizer(list(texts), add_special_tokens=flags.pop() if flags else True, **kwargs)
    return tokenizer.pad({"input_ids": [encode_prompt_text(tokenizer, text) for text in texts]}, **kwargs)


def has_room_for_response(prompt_ids: list[int], max_length: int) -> bool:
    """Whether a response token fits after the whole prompt within `max_length` (else: `NO_RESPONSE_TOKENS`)."""
    return len(prompt_ids) < max_length


@dataclass
class Encoded:
    """Token ids of one prompt+response, with `labels` = IGNORE_INDEX on prompt positions."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def end_of_response_ids(tokenizer: PreTrainedTokenizerBase, template: str = "auto") -> list[int]:
    """Token ids that close a response under `template` (usually just EOS)."""
    marker = response_eos(template, tokenizer)
    if marker is None:
        return []
    if marker == tokenizer.eos_token and tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return tokenizer(marker, add_special_tokens=False)["input_ids"]


def encode_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    response: str,
    max_length: int,
    *,
    min_response_tokens: int = 1,
    end_ids: list[int] | None = None,
) -> Encoded:
    """Append the response (plus `end_ids`, default EOS) to encoded prompt ids; apply the truncation policy."""
    if end_ids is None:
        end_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + end_ids
    truncated = len(prompt_ids) + len(response_ids) > max_length
    if truncated:
        keep_response = max(min_response_tokens, max_length - len(prompt_ids))
        response_ids = response_ids[:keep_response]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(response_ids)):]
    return Encoded(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        truncated=truncated,
    )


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The one pad-token fix-up: a tokenizer without a pad token pads with its EOS token. Returns `tokenizer`.

    Padding positions are masked (attention 0, label IGNORE_INDEX), so which id pads does not matter.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], example: dict[str, Any], max_length: int,
                *, end_ids: list[int] | None = None) -> dict[str, Encoded]:
    """Both responses of a pair (`example["chosen"]`, `example["rejected"]`) after the same prompt ids.

    Each side gets `encode_response`'s truncation policy on its own; keys are "chosen", "rejected".
    """
    return {side: encode_response(tokenizer, prompt_ids, example[side], max_length, end_ids=end_ids)
            for side in PAIR_SIDES}


def pair_columns(encoded: dict[str, Encoded]) -> dict[str, list[int]]:
    """`{chosen,rejected}_input_ids` and `{chosen,rejected}_labels` of an `encode_pair` result (the collator's rows)."""
    columns = {}
    for side, enc in encoded.items():
        columns[f"{side}_input_ids"], columns[f"{side}_labels"] = enc.input_ids, enc.labels
    return columns


def load_tokenizer(name_or_path: str, key: str = "data.tokenizer_name_or_path") -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` (hub id or local folder) with a pad token guaranteed (`ensure_pad_token`).

    What cannot be loaded (no such folder, an uncached hub id offline or with the Hub unreachable, a folder
    without tokenizer files) is a one-paragraph `UserInputError` naming `key` (`check_pretrained_source`).
    """
    from transformers import AutoTokenizer

    from datamodules.utils.errors import UserInputError

    check_pretrained_source(name_or_path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        raise UserInputError(f"{key}={name_or_path!r}: cannot load a tokenizer: {' '.join(str(error).split())}") \
            from error
    return ensure_pad_token(tokenizer)


def check_pretrained_source(name_or_path: str, key: str) -> None:
    """Fail fast, naming `key`, where `from_pretrained(name_or_path)` would fail with tracebacks or retries.

    A path that looks local (exists, starts with `/ . ~ runs/`, has more than one `/`, or is no valid hub id) and
    does not exist: the error says which step writes it when a config's `dirpath:` or the Makefile's `--out` does.
    A hub id (`name`, `org/name`) not in the Hugging Face cache, with HF_HUB_OFFLINE set or the Hub unreachable
    (one socket connect of at most 3 s, where from_pretrained spends ~25 s of retries per file; skipped behind a
    proxy). A cached hub id, or any hub id with the Hub reachable, passes: from_pretrained decides.
    (Shared by `load_tokenizer`, `lightning_modules.models.loading.load_causal_lm` and the CLI's input check.)
    """
    import os
    import re
    import socket
    from pathlib import Path
    from urllib.parse import urlparse

    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import validate_repo_id

    from datamodules.utils.errors import UserInputError

    path = Path(name_or_path).expanduser()
    if path.exists():
        return
    try:
        validate_repo_id(name_or_path)
        hub_id = not (name_or_path.startswith(("/", ".", "~", "runs/")) or (os.sep != "/" and os.sep in name_or_path))
    except HFValidationError:
        hub_id = False
    if not hub_id:
        repo = Path(__file__).resolve().parents[1]
        spellings = {name_or_path.rstrip("/"), os.path.relpath(path.resolve(), repo)}
        step, longest = None, 0
        for config in sorted((repo / "configs").rglob("*.yaml")):  # the config whose outputs hold the path
            text = config.read_text()
            roots = re.findall(r"^\s*default_root_dir:\s*['\"]?([^'\"\s#]+)", text, re.M)
            exports = re.findall(r"dirpath:\s*['\"]?([^'\"\s,}#]+)", text)
            for out in [r.rstrip("/") for r in roots] + [d.rstrip("/") for d in exports if d.startswith("runs/")]:
                if len(out) > longest and any(s == out or s.startswith(out + "/") for s in spellings):
                    step, longest = f"`python -m lightning_modules fit --config {config.relative_to(repo)}`", len(out)
        makefile = repo / "Makefile"
        for line in makefile.read_text().splitlines() if step is None and makefile.exists() else []:
            made = re.search(r"-m (\S+ .*--out (\S+))", line)
            if made and any(s == made[2] or s.startswith(made[2] + "/") for s in spellings):
                step = f"`python -m {made[1]}`"
                break
        where = "" if path.is_absolute() else f" (looked for {path.resolve()})"
        advice = (f"it is written by {step}: run that step first" if step else
                  "if it is the output of an earlier step (e.g. the ExportPretrained dirpath of a training run), "
                  "run that step first; a Hugging Face Hub id has the form name or org/name")
        raise UserInputError(f"{key}={name_or_path!r}: no such folder{where}; {advice}")
    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name_or_path, repo_type="model") / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return
    not_here = f"{key}={name_or_path!r} is neither a local folder nor in the Hugging Face cache ({snapshots.parent})"
    local = (f"or set {key} to a local folder in from_pretrained layout (a path that starts with ./ is never "
             "taken for a hub id)")
    offline_values = {"1", "ON", "YES", "TRUE"}
    if constants.HF_HUB_OFFLINE or any(os.environ.get(v, "").upper() in offline_values
                                       for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        raise UserInputError(f"{not_here}, and HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE to "
                             f"download it once, {local}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # the Hub may be reachable only through the proxy: let from_pretrained try
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=3).close()
    except OSError as error:
        raise UserInputError(f"{not_here}, and the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
                             f"({error}): check the connection, {local}; once it is cached, HF_HUB_OFFLINE=1 "
                             "skips the Hub") from error
