"""Any Hugging Face sequence-classification reward model, with its own tokenizer and chat template.

One `(prompt, response)` pair becomes one text (`render_conversation`), tokenized by the reward
model's tokenizer, cut to its last `max_length` tokens, and right-padded into a batch; the reward is
the logit `label_index` of `AutoModelForSequenceClassification`, which pools the last non-pad token.
Worked example of one batch (pad id 0, `max_length` 4, texts of 2 and 6 tokens)::

    rows            [[5, 6], [1, 2, 3, 4, 5, 6]]
    cut             [[5, 6], [3, 4, 5, 6]]          the end of a long text survives (the response)
    input_ids       [[5, 6, 0, 0], [3, 4, 5, 6]]    right padding
    attention_mask  [[1, 1, 0, 0], [1, 1, 1, 1]]
    pooled          token 6 of each row → logits (2, num_labels) → rewards logits[:, label_index]

torch and transformers are imported inside the functions, so importing the package stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from datamodules.chat import ASSISTANT, Prompt, as_messages, message
from datamodules.templates import BLANK_LINE, TEMPLATES, has_chat_template, render_prompt, response_eos
from datamodules.tokenize import encode_prompt_text
from datamodules.utils.errors import UserInputError
from lightning_modules.rewards.base import RewardContext, RewardFunction

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

KEY = "model.init_args.reward.init_args"
"""Where a reward's options sit in a config (named by error messages)."""
Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = ("float32", "bfloat16", "float16")


def render_conversation(prompt: Prompt, response: str, template: str = "auto", tokenizer: Any = None) -> str:
    """The text a reward model scores: `prompt` (a string or message list) answered by `response`.

    `template` is one of `datamodules.templates.TEMPLATES`, resolved for the *reward model's* tokenizer:

    - `tokenizer`: its chat template over the messages plus `{"role": "assistant", "content": response}`
      (no generation prompt), e.g. `"<|user|>\\nHi\\n<|assistant|>\\nHello</s>\\n"` for a Zephyr-like one;
    - `plain`: every turn's content joined by blank lines, `"Hi\\n\\nHello"` (no markers, no EOS);
    - `zephyr` / `alpacafarm`: `render_prompt(prompt)` + response + the template's end marker, exactly
      the policy's training text, e.g. `"<|prompter|>Hi<|endoftext|><|assistant|>Hello<|endoftext|>"`;
    - `auto`: `tokenizer` when the tokenizer has a chat template, else `plain` (unlike the policy's
      `auto`, which falls back to `zephyr`: a classifier without a chat template is usually a plain-text one).
    """
    if template not in TEMPLATES:
        raise UserInputError(f"{KEY}.template={template!r} is not a known template; use one of {list(TEMPLATES)}")
    if template == "auto":
        template = "tokenizer" if has_chat_template(tokenizer) else "plain"
    messages = as_messages(prompt)
    if template == "tokenizer":
        if not has_chat_template(tokenizer):
            raise UserInputError(f"{KEY}.template='tokenizer' but the reward model's tokenizer has no chat template; "
                                 "set it to 'plain', 'zephyr' or 'alpacafarm'")
        return tokenizer.apply_chat_template([*messages, message(ASSISTANT, response)], tokenize=False)
    if template == "plain":
        return BLANK_LINE.join([m["content"] for m in messages] + [response])
    return render_prompt(prompt, template=template, tokenizer=tokenizer) + response + \
        (response_eos(template, tokenizer) or "")


def right_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask`, both (B, T) with T the longest row, padded on the right."""
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def load_reward_model(name_or_path: str, dtype: Dtype = "float32", key: str = f"{KEY}.name_or_path"
                      ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The classifier (eval mode, frozen) and its tokenizer, from a hub id or a local folder.

    A tokenizer without a pad token pads with EOS (`datamodules.tokenize.ensure_pad_token`); a model config
    without `pad_token_id` gets the tokenizer's, so the classifier finds each row's last real token. What
    cannot be loaded, or a causal LM without a reward head (its score layer would be random), is a
    one-paragraph `UserInputError` naming `key`.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    from datamodules.tokenize import load_tokenizer
    from lightning_modules.models.loading import damaged_weights_message

    tokenizer = load_tokenizer(name_or_path, key)  # checks the source first (check_pretrained_source)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=getattr(torch, dtype))
    except SafetensorError as error:
        raise UserInputError(damaged_weights_message(name_or_path, key, error)) from error
    except (OSError, ValueError) as error:  # no weights / config; a config type without a classification class
        raise UserInputError(f"{key}={name_or_path!r}: cannot load a sequence-classification reward model: "
                             f"{' '.join(str(error).split())}") from error
    architectures = model.config.architectures or []
    if architectures and not any("ForSequenceClassification" in a for a in architectures):
        raise UserInputError(f"{key}={name_or_path!r} is a {', '.join(architectures)}, not a sequence-classification "
                             "reward model: its reward head would be randomly initialized; point it at a reward model")
    if model.config.pad_token_id is None:
        if tokenizer.pad_token_id is None:
            raise UserInputError(f"{key}={name_or_path!r}: the tokenizer has neither a pad nor an EOS token, so "
                                 "batches cannot be padded")
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval().requires_grad_(False), tokenizer


class RewardModel(RewardFunction):
    """r = logits[label_index] of a Hugging Face sequence-classification model on the rendered conversation.

    Loads in `setup` onto `context.device` (or, without setup, on the first call, on CPU). Texts longer
    than `max_length` tokens keep their last `max_length` tokens (the response and the end of the prompt;
    a leading BOS is cut with the rest). Frozen, so `state_dict` is empty: the weights are `name_or_path`.
    """

    name = "reward_model"

    def __init__(self, name_or_path: str, template: str = "auto", label_index: int = 0, batch_size: int = 16,
                 max_length: int = 1024, dtype: Dtype = "float32") -> None:
        """Build the reward (nothing is loaded until `setup` or the first call).

        Args:
            name_or_path: Hugging Face hub id or local folder of the reward model and its tokenizer.
            template: How (prompt, response) is rendered: auto, tokenizer, plain, zephyr or alpacafarm.
            label_index: Which output logit is the reward (0 for single-output reward models).
            batch_size: Conversations scored per forward pass.
            max_length: Token limit per conversation; longer ones keep their last max_length tokens.
            dtype: Weights dtype of the reward model: float32, bfloat16 or float16.
        """
        if template not in TEMPLATES:
            raise UserInputError(f"{KEY}.template={template!r} is not a known template; use one of {list(TEMPLATES)}")
        if dtype not in DTYPES:
            raise UserInputError(f"{KEY}.dtype={dtype!r}: use one of {list(DTYPES)}")
        for key, value, low in (("label_index", label_index, 0), ("batch_size", batch_size, 1),
                                ("max_length", max_length, 1)):
            if value < low:
                raise UserInputError(f"{KEY}.{key} must be >= {low}, got {value}")
        self.name_or_path, self.template, self.label_index = name_or_path, template, label_index
        self.batch_size, self.max_length, self.dtype = batch_size, max_length, dtype
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def setup(self, context: RewardContext) -> None:
        """Load the model (once) and move it to `context.device`."""
        self.load()
        self.model.to(context.device)

    def load(self) -> None:
        """Load model and tokenizer unless already loaded; check `label_index` against the model's outputs."""
        if self.model is not None:
            return
        model, tokenizer = load_reward_model(self.name_or_path, self.dtype)
        if self.label_index >= model.config.num_labels:
            raise UserInputError(f"{KEY}.label_index={self.label_index}, but {self.name_or_path!r} has "
                                 f"{model.config.num_labels} output(s)")
        self.model, self.tokenizer = model, tokenizer

    def encode(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each rendered conversation, at most the last `max_length` of them."""
        texts = [render_conversation(p, r, self.template, self.tokenizer) for p, r in zip(prompts, responses)]
        return [encode_prompt_text(self.tokenizer, text)[-self.max_length:] for text in texts]

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        import torch

        self.load()
        rows, rewards = self.encode(prompts, responses), []
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                input_ids, attention_mask = right_pad(batch, self.model.config.pad_token_id)  # (B, T) each
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
                rewards += logits[:, self.label_index].float().tolist()  # (B, num_labels) -> B floats
        return rewards
