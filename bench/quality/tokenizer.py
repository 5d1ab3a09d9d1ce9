"""A byte-level BPE tokenizer trained with the `tokenizers` library on the training text (no hub).

Byte-level: any text (code, English instructions, unicode) encodes with no unknown token. Specials <pad> <s> </s>;
<s> is added in front of plain text (like Llama) and the chat template is the demo's `User:` / `Assistant:` one
(`upcycle_ds.demo.CHAT_TEMPLATE`), so the same tokenizer serves pretraining (text rows) and instruction tuning
(messages rows). Training is single-threaded here (RAYON_NUM_THREADS=1 for the BPE trainer): the merges are then the
same on every run for the same text.
"""

from __future__ import annotations

import os
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>"]


def train_bpe(texts: list[str], vocab_size: int, out: Path) -> Path:
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from upcycle_ds.demo import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", chat_template=CHAT_TEMPLATE,
                                                model_max_length=1 << 20)
    fast.save_pretrained(out)
    return Path(out)
