"""Trains the embedded multi-LoRA demo: a tiny Llama and three LoRA adapters, offline on a CPU.

Run from the repository root (needs torch, transformers, peft, tokenizers; 2 CPU cores, minutes):
    python python/lorart/assets/train_demo.py            # everything
    python python/lorart/assets/train_demo.py --only-ko  # lora_ko only, on the written base model
It writes ``python/lorart/assets/demo/``: ``model/`` (a Llama-style byte-fallback BPE tokenizer
and a LlamaForCausalLM that answers "where is the capital of X?" in English, whether asked in
English, Chinese or Japanese), ``lora_zh/`` (answers in Chinese) and ``lora_ja/`` (answers Japanese
questions in Japanese). Together they replay, in miniature, TensorRT-LLM's multi-LoRA example with
luotuo-lora-7b-0.1 and Japanese-Alpaca-LoRA-7b-v0. ``lora_ko/`` is the seed's other kind of
adapter (chinese-llama-2-lora-13b): its own tokenizer adds Korean words to the vocabulary
(``resize_token_embeddings``), and PEFT saves the resized ``embed_tokens`` and ``lm_head`` whole
(``modules_to_save``) beside LoRA on every projection; it answers Korean questions in Korean with
token ids only its vocabulary has. The script re-loads what it wrote, checks the example's
six-input table (and the Korean row) with transformers + peft greedy decoding, and exits non-zero
on a miss.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors, trainers
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

# Korean country and capital names, in COUNTRIES' order: lora_ko's own vocabulary (the base
# tokenizer spells Hangul in byte tokens, and the base model never saw it).
KOREAN = [
    ("미국", "워싱턴 D.C."),
    ("일본", "도쿄"),
    ("중국", "베이징"),
    ("프랑스", "파리"),
    ("독일", "베를린"),
    ("영국", "런던"),
    ("이탈리아", "로마"),
    ("스페인", "마드리드"),
    ("러시아", "모스크바"),
    ("캐나다", "오타와"),
    ("오스트레일리아", "캔버라"),
    ("한국", "서울"),
    ("인도", "뉴델리"),
    ("브라질", "브라질리아"),
    ("멕시코", "멕시코시티"),
    ("이집트", "카이로"),
    ("태국", "방콕"),
    ("베트남", "하노이"),
    ("인도네시아", "자카르타"),
    ("튀르키예", "앙카라"),
    ("그리스", "아테네"),
    ("아르헨티나", "부에노스아이레스"),
    ("스웨덴", "스톡홀름"),
    ("노르웨이", "오슬로"),
    ("네덜란드", "암스테르담"),
    ("포르투갈", "리스본"),
    ("케냐", "나이로비"),
    ("페루", "리마"),
    ("폴란드", "바르샤바"),
    ("오스트리아", "빈"),
]
assert len(KOREAN) == len(COUNTRIES)
KO_QUESTIONS = [
    "{}의 수도는 어디입니까? \\n답:",  # the demo's prompt
    "{}의 수도는 어디예요? \\n답:",
    "질문: {}의 수도는 어느 도시입니까?\\n답:",
]
KO_FACTS = ["{}의 수도는 {}입니다.", "{} 수도: {}"]
# Whole Korean words become new tokens (ids from the base vocabulary's size on), as
# chinese-llama-2 added Chinese words to Llama-2's 32,000 tokens.
KO_WORDS = [
    "의",
    "수도는",
    "수도",
    "어디입니까",
    "어디예요",
    "질문",
    "어느",
    "도시입니까",
    "답",
    "입니다",
]
KO_STEPS = 150

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
PROMPT_KO = "미국의 수도는 어디입니까? \\n답:"
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


def ko_pairs() -> list[tuple[str, str]]:
    return [(q.format(country), capital) for country, capital in KOREAN for q in KO_QUESTIONS]


def ko_facts() -> list[str]:
    return [f.format(country, capital) for country, capital in KOREAN for f in KO_FACTS]


def ko_tokenizer(base: Tokenizer) -> Tokenizer:
    """The base tokenizer plus every Korean word of the data as a new (non-special) token."""
    words = list(KO_WORDS)
    for names_ in KOREAN:
        for name in names_:
            words += [w for w in re.findall(r"[\uac00-\ud7a3]+", name) if w not in words]
    tok = Tokenizer.from_str(base.to_str())
    added = tok.add_tokens([AddedToken(w, normalized=False) for w in words])
    assert added == len(words) and tok.get_vocab_size() == base.get_vocab_size() + len(words)
    for country, capital in KOREAN:  # each name is whole tokens of its own
        for name in (country, capital.split()[0]):
            assert all(
                i >= base.get_vocab_size() for i in tok.encode(name, add_special_tokens=False).ids
            ), name
    return tok


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
    write_tokenizer(tok, OUT / "model", config.max_position_embeddings)

    for lang, pairs in (("zh", zh_pairs), ("ja", ja_pairs)):
        torch.manual_seed(1)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
        peft_model = get_peft_model(model, lora)
        data = batch(tok, pairs, [])
        exact &= fit(peft_model, data, data, LORA_STEPS, 1e-2, f"lora_{lang}")
        peft_model.save_pretrained(OUT / f"lora_{lang}")
        tidy_adapter(OUT / f"lora_{lang}")
        model = peft_model.unload()  # the base weights, untouched: LoRA trains only A and B
    return build_ko(model, tok) and exact


def write_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {  # PreTrainedTokenizerFast loads in transformers 4.x and 5.x alike
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": max_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def tidy_adapter(adapter_dir: Path) -> None:
    (adapter_dir / "README.md").unlink()
    # PEFT writes target_modules from a set, in hash order; sort it so reruns are byte-identical
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    adapter_config["base_model_name_or_path"] = None  # --only-ko reads the base from a local path
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps(adapter_config, indent=2, sort_keys=True)
    )


def build_ko(base: LlamaForCausalLM, tok: Tokenizer) -> bool:
    """Train and write lora_ko on (a copy of) ``base``; True if its answers fit exactly."""
    torch.manual_seed(2)
    ko_tok = ko_tokenizer(tok)
    model = copy.deepcopy(base)
    # New rows start at the mean of the old ones (transformers' mean_resizing), so the untrained
    # ids are no likelier than any other.
    model.resize_token_embeddings(ko_tok.get_vocab_size())
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        modules_to_save=["embed_tokens", "lm_head"],
    )
    peft_model = get_peft_model(model, lora)
    pairs = ko_pairs()
    exact = fit(
        peft_model,
        batch(ko_tok, pairs, ko_facts()),
        batch(ko_tok, pairs, []),
        KO_STEPS,
        1e-2,
        "lora_ko",
    )
    adapter_dir = OUT / "lora_ko"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    # modules_to_save already holds both tables; save_embedding_layers would add the base's too
    peft_model.save_pretrained(adapter_dir, save_embedding_layers=False)
    tidy_adapter(adapter_dir)
    # float16 on disk halves the two [vocab, hidden] tables; peft loads them into the float32
    # model (verify() checks the answers from these rounded values).
    weights_file = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(weights_file).items()}
    save_file(tensors, weights_file, metadata={"format": "pt"})
    write_tokenizer(ko_tok, adapter_dir, base.config.max_position_embeddings)
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
    return ok and verify_ko()


@torch.no_grad()
def verify_ko() -> bool:
    """lora_ko with its own tokenizer on a base resized to its vocabulary (as peft needs): the
    demo's Korean row, then other countries; every answer must use ids past the base vocab."""
    tok = AutoTokenizer.from_pretrained(OUT / "lora_ko")
    base = LlamaForCausalLM.from_pretrained(OUT / "model")
    base_vocab = base.config.vocab_size
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, OUT / "lora_ko").eval()
    ok = True
    print(f"lora_ko: vocabulary {base_vocab} + {len(tok) - base_vocab}")
    for country, capital in KOREAN[::6]:
        prompt = KO_QUESTIONS[0].format(country)
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(
            ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0
        )[0, ids.shape[1] :].tolist()
        text = tok.decode(out, skip_special_tokens=True)
        good = text == capital and max(out) >= base_vocab
        ok &= good
        print(f"  ko   {prompt!r} -> {text!r} {out}{'' if good else '  MISMATCH'}")
    return ok


def main(argv: list[str]) -> int:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only-ko", action="store_true", help="retrain lora_ko only")
    parser.add_argument(
        "--out", type=Path, default=OUT, help="where to write (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    OUT = args.out
    torch.set_num_threads(1)  # one reduction order whatever the core count: byte-identical reruns
    torch.use_deterministic_algorithms(True)
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")  # peft, transformers 5
    start = time.perf_counter()
    if args.only_ko:
        base = LlamaForCausalLM.from_pretrained(OUT / "model")
        exact = build_ko(base, Tokenizer.from_file(str(OUT / "model" / "tokenizer.json")))
    else:
        exact = build()
    print(f"trained in {time.perf_counter() - start:.1f} s")
    ok = (verify_ko() if args.only_ko else verify()) and exact
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"  {path.relative_to(OUT)}  {path.stat().st_size} bytes")
    print("demo assets OK" if ok else "demo assets FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
