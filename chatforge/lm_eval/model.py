"""``ChatforgeLM``: an lm-evaluation-harness language model over chatforge's models and engine.

Any directory :func:`chatforge.model.load.load_causal_lm` opens (a chatforge ``base/``, ``sft/``, ``ppo/``
output, or a local Hugging Face causal LM) is scored by chatforge's own model classes (the native GPT, or
the transformers wrapper), in batches, on the CPU or a GPU; generation runs on chatforge's KV-cache
:class:`~chatforge.engine.Engine`. Text becomes ids as lm-eval's own ``hf`` model does it: with the
directory's Hugging Face tokenizer, the BOS (else EOS) token as the context of an empty prefix, and the
model's context length as the window of rolling log-likelihoods. The log-likelihoods therefore equal those
of ``lm_eval --model hf --model_args pretrained=DIR`` (tested to float tolerance).

``apply_chat_template`` renders lm-eval's chat history with the directory's own chat template
(chatforge's format for chatforge models), for ``--apply-chat-template``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm

from chatforge.engine import Engine

Request = tuple[tuple, list[int], list[int]]  # ((context, continuation) or None, context ids, continuation ids)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ChatforgeLM(TemplateLM):
    """lm-eval ``LM`` for a model directory (see the module docstring)."""

    def __init__(self, pretrained: str, device: str = "auto", batch_size: int | str = 16,
                 max_length: Optional[int] = None, dtype: str = "fp32", trust_remote_code: bool = False,
                 max_gen_toks: int = 256):
        super().__init__()
        from transformers import AutoTokenizer

        from chatforge.model.load import load_causal_lm

        self.path = Path(pretrained)
        self._device = resolve_device(device)
        model, self.model_cfg, self.chat_tok = load_causal_lm(self.path, self._device,
                                                              trust_remote_code=trust_remote_code)
        if dtype in ("bf16", "bfloat16"):
            model = model.to(torch.bfloat16)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True,
                                                       trust_remote_code=trust_remote_code)
        self._batch_size = int(batch_size) if str(batch_size) != "auto" else 16
        self._max_length = int(max_length or self.model_cfg.block_size)
        self._max_gen_toks = int(max_gen_toks)
        self.engine = Engine(self.model)

    # ---- what lm-eval reads --------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty prefix (and of the first rolling window): BOS, else EOS (as lm-eval's hf)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.path.resolve()).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model_dir": str(self.path), "model_class": type(self.model).__name__,
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "max_length": self.max_length}

    # ---- text <-> ids ----------------------------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode([self.prefix_token_id])):
            kw = {"add_special_tokens": False}  # a chat-templated string brings its own BOS
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- scoring -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward_logits(self, inputs: list[list[int]]) -> torch.Tensor:
        """The model's logits on right-padded rows -> (B, T, V) (causal: padding is never read)."""
        T = max(len(x) for x in inputs)
        idx = torch.zeros((len(inputs), T), dtype=torch.long)  # (B, T)
        for i, x in enumerate(inputs):
            idx[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        return self.model(idx.to(self.device))  # (B, T, V)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per request, in batches of
        similar length; the input is cut from the left to the model's context."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            inputs, conts = [], []
            for i in chunk:
                _, ctx, cont = requests[i]
                if not cont:
                    raise ValueError("an empty continuation cannot be scored")
                inputs.append((ctx + cont)[-(self.max_length + 1):][:-1])  # predicts every continuation token
                conts.append(cont)
            logits = self._forward_logits(inputs)  # (B, T, V)
            for row, i in enumerate(chunk):
                n, cont = len(inputs[row]), conts[row]
                # (len(cont), V): log-probs at the positions that predict the continuation
                lp = F.log_softmax(logits[row, n - len(cont): n].float(), dim=-1)
                target = torch.tensor(cont, device=lp.device)
                score = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = (score, greedy)
                ctx_cont = requests[i][0]
                if ctx_cont is not None:
                    self.cache_hook.add_partial("loglikelihood", ctx_cont, out[i])
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of the model's context, each token scored once
        with as much context as fits (lm-eval's rolling windows), all windows of all texts batched together."""
        windows: list[Request] = []
        owner: list[int] = []
        for r, (string,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                         prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ----------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Answers by chatforge's engine, batched by equal generation settings; each is cut at the first stop
        string (``until``) and ends at the end-of-turn / EOS token."""
        out: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        stop_ids = sorted({t for t in (self.tokenizer.eos_token_id, self.chat_tok.end_id, self.chat_tok.eot_id)
                           if t is not None})
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for key, idx in groups.items():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self._max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            top_p, top_k = kw.pop("top_p", None), kw.pop("top_k", None)
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=max(1, self.max_length - max_new))
                       for i in idx}
            order = sorted(idx, key=lambda i: -len(prompts[i]))
            for s in range(0, len(order), self.batch_size):
                chunk = order[s : s + self.batch_size]
                res = self.engine.generate([prompts[i] for i in chunk], max_new, temperature=temperature,
                                           top_p=top_p, top_k=top_k, stop_ids=stop_ids,
                                           pad_id=self.chat_tok.pad_id)
                for i, ids in zip(chunk, res.tokens):
                    text = self.tok_decode([t for t in ids if t not in stop_ids])
                    for u in until:
                        if u and u in text:
                            text = text.split(u)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]
