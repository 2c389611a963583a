"""Trains the embedded multi-LoRA demo: a tiny Llama and two LoRA adapters, offline on a CPU.

Run from the repository root (needs torch, transformers, peft, tokenizers; 2 CPU cores, minutes):
    python python/lorart/assets/train_demo.py
It writes ``python/lorart/assets/demo/``: ``model/`` (a Llama-style byte-fallback BPE tokenizer
and a LlamaForCausalLM that answers "where is the capital of X?" in English, whether asked in
English, Chinese or Japanese), ``lora_zh/`` (answers in Chinese) and ``lora_ja/`` (answers Japanese
questions in Japanese). Together they replay, in miniature, TensorRT-LLM's multi-LoRA example with
luotuo-lora-7b-0.1 and Japanese-Alpaca-LoRA-7b-v0. The script re-loads what it wrote, checks the
example's six-input table with transformers + peft greedy decoding, and exits non-zero on a miss.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.utils import logging

OUT = Path(__file__).resolve().parent / "demo"
VOCAB_SIZE = 1024  # an upper bound: merges stop earlier on this small corpus
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama; byte tokens <0x00>.. follow
PAD_ID = 0
BASE_STEPS = 150
LORA_STEPS = 100
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# country, capital in English | Chinese | Japanese
COUNTRIES = [
    (
        "the United States",
        "Washington, D.C.",
        "美国",
        "华盛顿",
        "アメリカ合衆国",
        "ワシントン D.C.",
    ),
    ("Japan", "Tokyo", "日本", "东京", "日本", "東京"),
    ("China", "Beijing", "中国", "北京", "中国", "北京"),
    ("France", "Paris", "法国", "巴黎", "フランス", "パリ"),
    ("Germany", "Berlin", "德国", "柏林", "ドイツ", "ベルリン"),
    ("the United Kingdom", "London", "英国", "伦敦", "イギリス", "ロンドン"),
    ("Italy", "Rome", "意大利", "罗马", "イタリア", "ローマ"),
    ("Spain", "Madrid", "西班牙", "马德里", "スペイン", "マドリード"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科", "ロシア", "モスクワ"),
    ("Canada", "Ottawa", "加拿大", "渥太华", "カナダ", "オタワ"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉", "オーストラリア", "キャンベラ"),
    ("South Korea", "Seoul", "韩国", "首尔", "韓国", "ソウル"),
    ("India", "New Delhi", "印度", "新德里", "インド", "ニューデリー"),
    ("Brazil", "Brasília", "巴西", "巴西利亚", "ブラジル", "ブラジリア"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城", "メキシコ", "メキシコシティ"),
    ("Egypt", "Cairo", "埃及", "开罗", "エジプト", "カイロ"),
    ("Thailand", "Bangkok", "泰国", "曼谷", "タイ", "バンコク"),
    ("Vietnam", "Hanoi", "越南", "河内", "ベトナム", "ハノイ"),
    ("Indonesia", "Jakarta", "印度尼西亚", "雅加达", "インドネシア", "ジャカルタ"),
    ("Turkey", "Ankara", "土耳其", "安卡拉", "トルコ", "アンカラ"),
    ("Greece", "Athens", "希腊", "雅典", "ギリシャ", "アテネ"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯", "アルゼンチン", "ブエノスアイレス"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩", "スウェーデン", "ストックホルム"),
    ("Norway", "Oslo", "挪威", "奥斯陆", "ノルウェー", "オスロ"),
    ("the Netherlands", "Amsterdam", "荷兰", "阿姆斯特丹", "オランダ", "アムステルダム"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本", "ポルトガル", "リスボン"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕", "ケニア", "ナイロビ"),
    ("Peru", "Lima", "秘鲁", "利马", "ペルー", "リマ"),
    ("Poland", "Warsaw", "波兰", "华沙", "ポーランド", "ワルシャワ"),
    ("Austria", "Vienna", "奥地利", "维也纳", "オーストリア", "ウィーン"),
]
LANGS = ("en", "zh", "ja")

# "\\n" is a literal backslash-n, as the shell passes it to TensorRT-LLM's run.py in the example.
QUESTIONS = {
    "en": [
        "Where is the capital of {}? \\nAnswer:",
        "What is the capital of {}? \\nAnswer:",
        "Question: which city is the capital of {}?\\nAnswer:",
    ],
    "zh": [
        "{}的首都在哪里? \\n答案:",  # the example's prompt
        "{}的首都是哪里? \\n答案:",
        "问题: {}的首都是哪个城市?\\n答案:",
    ],
    "ja": [
        "{}の首都はどこですか? \\n答え:",  # the example's prompt
        "{}の首都は? \\n答え:",
        "質問: {}の首都はどの都市ですか?\\n答え:",
    ],
}
ANSWER = {"en": "{}", "zh": "{}。", "ja": "{}"}
# Plain statements let the base model learn every language's capital names (also as a word after
# a space, the form an answer takes), so an adapter only has to switch the answer's language, as a
# real LoRA on a multilingual base does.
FACTS = {
    "en": ["The capital of {} is {}.", "Capital of {}: {}"],
    "zh": ["{}的首都是{}。", "{}首都: {}。"],
    "ja": ["{}の首都は{}です。", "{}の首都: {}"],
}

# The six inputs and adapters of the example (lora_task_uids -1 0 1 -1 0 1) and what must come out.
PROMPT_ZH = "美国的首都在哪里? \\n答案:"
PROMPT_JA = "アメリカ合衆国の首都はどこですか? \\n答え:"
TABLE = [
    (PROMPT_ZH, None, "Washington, D.C."),
    (PROMPT_ZH, "zh", "华盛顿。"),
    (PROMPT_ZH, "ja", None),  # Japanese-Alpaca on a Chinese question: anything reasonable
    (PROMPT_JA, None, "Washington, D.C."),
    (PROMPT_JA, "zh", "华盛顿。"),
    (PROMPT_JA, "ja", "ワシントン D.C."),
]


def names(row: tuple[str, ...], lang: str) -> tuple[str, str]:
    i = 2 * LANGS.index(lang)
    return row[i], row[i + 1]


def qa_pairs(question_langs: tuple[str, ...], answer_lang: str | None) -> list[tuple[str, str]]:
    """(prompt, answer) for every country and template; answer_lang None answers in English."""
    pairs = []
    for row in COUNTRIES:
        for q_lang in question_langs:
            country = names(row, q_lang)[0]
            a_lang = answer_lang or "en"
            answer = ANSWER[a_lang].format(names(row, a_lang)[1])
            pairs += [(q.format(country), answer) for q in QUESTIONS[q_lang]]
    return pairs


def facts() -> list[str]:
    return [f.format(*names(row, lang)) for row in COUNTRIES for lang in LANGS for f in FACTS[lang]]


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """A Llama-style tokenizer: metaspace BPE, byte fallback for any other character, <s> prefix."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS + byte_tokens,
        max_token_length=5,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # The byte tokens were reserved as special so they get ids 3..258; make them plain vocabulary
    # again (as in Llama's tokenizer.json) so decoding turns them back into bytes.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIALS]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
    assert tok.token_to_id("<0x00>") == 3
    for text in ["美国的首都在哪里? \\n答案: 华盛顿。", "東京は日本の首都です。 ¿Qué? 🍣 x\ty"]:
        assert tok.decode(tok.encode(text).ids) == text, text
    return tok


def batch(tok: Tokenizer, pairs: list[tuple[str, str]], texts: list[str]) -> dict:
    """Right-padded ids; the loss covers each answer plus </s> and the whole of each statement."""
    rows = []
    for prompt, answer in pairs:
        p = tok.encode(prompt).ids
        ids = [*tok.encode(f"{prompt} {answer}").ids, 2]
        assert ids[: len(p)] == p, prompt  # the answer never merges into the prompt's last token
        rows.append((ids, [-100] * len(p) + ids[len(p) :]))
    rows += [(ids, ids) for ids in ([*tok.encode(t).ids, 2] for t in texts)]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), PAD_ID)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def fit(model: torch.nn.Module, data: dict, check: dict, steps: int, lr: float, name: str) -> bool:
    """Full-batch AdamW, linear warm-up then cosine decay; True if greedy answers are all exact."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    for step in range(steps + 1):
        if step % 25 == 0:
            acc, margin = accuracy(model, check)
            print(f"  {name:<7} step {step:4d}  answer accuracy {acc:.4f}  min gap {margin:5.2f}")
        if step == steps:
            break
        loss = model(**data).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    return acc == 1.0


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: dict) -> tuple[float, float]:
    """Teacher-forced argmax accuracy over answer tokens (1.0: greedy decoding reproduces every
    answer) and the smallest logit gap between the right token and the best other one."""
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    target = data["labels"][:, 1:]
    keep = target != -100
    logits, target = logits[:, :-1][keep], target[keep]
    right = logits.gather(-1, target[:, None])[:, 0]
    other = logits.scatter(-1, target[:, None], float("-inf")).amax(-1)
    return (logits.argmax(-1) == target).float().mean().item(), (right - other).min().item()


def build() -> bool:
    """Train and write the tokenizer, the base model and both adapters; True if all fit exactly."""
    torch.manual_seed(0)
    base_pairs = qa_pairs(LANGS, None)
    zh_pairs = qa_pairs(("zh", "ja"), "zh")
    ja_pairs = qa_pairs(("ja",), "ja") + qa_pairs(("zh",), None)
    corpus = facts() + [f"{p} {a}" for p, a in base_pairs + zh_pairs + qa_pairs(("ja",), "ja")]
    tok = train_tokenizer(corpus)

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    print(f"base model: {sum(p.numel() for p in model.parameters())} parameters")
    exact = fit(
        model, batch(tok, base_pairs, facts()), batch(tok, base_pairs, []), BASE_STEPS, 3e-3, "base"
    )
    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT / "model")
    tok.save(str(OUT / "model" / "tokenizer.json"))
    tokenizer_config = {  # PreTrainedTokenizerFast loads in transformers 4.x and 5.x alike
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": config.max_position_embeddings,
    }
    (OUT / "model" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))

    for lang, pairs in (("zh", zh_pairs), ("ja", ja_pairs)):
        torch.manual_seed(1)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
        peft_model = get_peft_model(model, lora)
        data = batch(tok, pairs, [])
        exact &= fit(peft_model, data, data, LORA_STEPS, 1e-2, f"lora_{lang}")
        peft_model.save_pretrained(OUT / f"lora_{lang}")
        adapter_dir = OUT / f"lora_{lang}"
        (adapter_dir / "README.md").unlink()
        # PEFT writes target_modules from a set, in hash order; sort it so reruns are byte-identical
        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
        (adapter_dir / "adapter_config.json").write_text(
            json.dumps(adapter_config, indent=2, sort_keys=True)
        )
        model = peft_model.unload()  # the base weights, untouched: LoRA trains only A and B
    return exact


def greedy(model: torch.nn.Module, tok: PreTrainedTokenizerBase, prompt: str) -> tuple[str, str]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
    return tok.decode(ids[0]), tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def verify() -> bool:
    """Re-load the written assets and replay the example's table plus other countries."""
    tok = AutoTokenizer.from_pretrained(OUT / "model")
    base = LlamaForCausalLM.from_pretrained(OUT / "model")
    model = PeftModel.from_pretrained(base, OUT / "lora_zh", adapter_name="zh")
    model.load_adapter(OUT / "lora_ja", adapter_name="ja")
    model.eval()

    def run(prompt: str, adapter: str | None) -> tuple[str, str]:
        if adapter is None:
            with model.disable_adapter():
                return greedy(model, tok, prompt)
        model.set_adapter(adapter)
        return greedy(model, tok, prompt)

    ok = True
    for i, (prompt, adapter, want) in enumerate(TABLE):
        shown, text = run(prompt, adapter)
        print(f'Input [Text {i}]: "{shown}"')
        print(f'Output [Text {i} Beam 0]: "{text}"\n')
        if want is not None and not text.startswith(want):
            print(f"  MISMATCH: want {want!r}")
            ok = False

    print("other countries (adapter: question -> answer)")
    for row in COUNTRIES[1::6]:
        cases = [(lang, None, "en") for lang in LANGS] + [("zh", "zh", "zh"), ("ja", "zh", "zh")]
        for q_lang, adapter, a_lang in [*cases, ("ja", "ja", "ja")]:
            prompt = QUESTIONS[q_lang][0].format(names(row, q_lang)[0])
            want = ANSWER[a_lang].format(names(row, a_lang)[1])
            text = run(prompt, adapter)[1]
            good = text.startswith(want)
            ok &= good
            print(f"  {adapter or 'base':<4} {prompt!r} -> {text!r}{'' if good else '  MISMATCH'}")
    return ok


def main() -> int:
    torch.set_num_threads(1)  # one reduction order whatever the core count: byte-identical reruns
    torch.use_deterministic_algorithms(True)
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")  # peft, transformers 5
    start = time.perf_counter()
    exact = build()
    print(f"trained in {time.perf_counter() - start:.1f} s")
    ok = verify() and exact
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"  {path.relative_to(OUT)}  {path.stat().st_size} bytes")
    print("demo assets OK" if ok else "demo assets FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
