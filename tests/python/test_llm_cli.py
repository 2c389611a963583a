"""lorart.LLM, `lorart run` and `lorart demo` on the embedded demo model and adapters."""

from __future__ import annotations

import _thread
import logging
import shutil
import threading
import time

import pytest
from tiny_models import (
    adapter_with_own_tokenizer,
    build_causal_lm,
    endless_demo_model,
    run_lorart_cli,
)
from tokenizers import Tokenizer

import lorart
from lorart import LLM, demo, lora

DEMO = demo.DEMO
PROMPTS = [demo.ZH_PROMPT] * 3 + [demo.JA_PROMPT] * 3
ADAPTERS = [None, DEMO / "lora_zh", DEMO / "lora_ja"] * 2
# The seed tutorial's table (TensorRT-LLM's outputs for Llama-7B; here the demo model's).
EXPECTED = ["Washington, D.C.", "华盛顿。", None, "Washington, D.C.", "华盛顿。", "ワシントン D.C."]
# The adapter with its own vocabulary (1024 + 70 Korean words) and tokenizer.
KO = DEMO / "lora_ko"


@pytest.fixture(scope="module")
def llm():
    with LLM(DEMO / "model", max_batch_size=8, max_num_tokens=256, max_seq_len=128) as model:
        yield model


def test_seed_table_in_one_mixed_batch(llm):
    outputs = llm.generate(PROMPTS, lora=ADAPTERS, max_new_tokens=12)
    for out, want in zip(outputs, EXPECTED, strict=True):
        if want is not None:
            assert out.text == want
            assert out.finish_reason == "end_id"


def test_mixed_batch_equals_each_request_alone(llm):
    together = llm.generate(PROMPTS, lora=ADAPTERS, max_new_tokens=12)
    for prompt, adapter, out in zip(PROMPTS, ADAPTERS, together, strict=True):
        alone = llm.generate([prompt], lora=[adapter], max_new_tokens=12)[0]
        assert alone.token_ids == out.token_ids


def test_equals_transformers_and_peft_greedy(llm):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    outputs = llm.generate(PROMPTS, lora=ADAPTERS, max_new_tokens=12)
    models: dict = {}  # one HF model per adapter, not per prompt
    for prompt, adapter, out in zip(PROMPTS, ADAPTERS, outputs, strict=True):
        if adapter not in models:
            model = LlamaForCausalLM.from_pretrained(DEMO / "model").eval()
            if adapter is not None:
                model = PeftModel.from_pretrained(model, adapter).eval()
            models[adapter] = model
        model = models[adapter]
        ids = torch.tensor([llm.tokenizer.encode(prompt).ids])
        generated: list[int] = []
        with torch.no_grad():
            for _ in range(12):
                token = int(model(ids).logits[0, -1].argmax())
                if token == llm.eos_token_id:
                    break
                generated.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert out.token_ids == generated


def test_stream_concatenates_to_the_generated_text(llm):
    pieces = list(llm.generate_stream(demo.JA_PROMPT, lora=DEMO / "lora_ja", max_new_tokens=12))
    assert len(pieces) > 1
    assert "".join(pieces) == "ワシントン D.C."


def test_converted_npy_adapter_gives_the_same_output(llm, tmp_path):
    weights, config = lora.from_peft(DEMO / "lora_zh", llm.executor.model_config)
    lora.save_npy(tmp_path, weights, config)
    from_npy = llm.generate([demo.ZH_PROMPT], lora=[tmp_path], max_new_tokens=12)[0]
    from_peft = llm.generate([demo.ZH_PROMPT], lora=[DEMO / "lora_zh"], max_new_tokens=12)[0]
    assert from_npy.token_ids == from_peft.token_ids


def test_request_errors_raise_with_the_message(llm):
    with pytest.raises(ValueError, match="exceeds max_seq_len = 128"):
        llm.generate(["x " * 200], max_new_tokens=4)
    assert llm.generate([demo.ZH_PROMPT], max_new_tokens=12)[0].text == "Washington, D.C."


def test_lorart_demo_prints_the_seed_table():
    result = run_lorart_cli("demo")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines[0] == f'Input [Text 0]: "<s> {demo.ZH_PROMPT}"'
    assert lines[1] == 'Output [Text 0 Beam 0]: "Washington, D.C."'
    assert lines[3] == 'Output [Text 1 Beam 0]: "华盛顿。"'
    assert lines[11] == 'Output [Text 5 Beam 0]: "ワシントン D.C."'
    # The row of the adapter with its own vocabulary, in the same batch: its prompt shown with
    # its own tokenizer, its answer in ids only that vocabulary has.
    assert lines[12:] == [
        f'Input [Text 6]: "<s>{demo.KO_PROMPT}"',  # its first token is a word of its own
        'Output [Text 6 Beam 0]: "워싱턴 D.C."',
    ]


def test_lorart_run_flags():
    result = run_lorart_cli(
        "run",
        "--engine_dir",
        str(DEMO / "model"),
        "--input_text",
        demo.JA_PROMPT,
        demo.JA_PROMPT,
        "--lora_dir",
        str(DEMO / "lora_zh"),
        str(DEMO / "lora_ja"),
        "--lora_task_uids",
        "-1",
        "1",
        "--max_output_len",
        "12",
        "--use_py_session",
    )
    assert result.returncode == 0, result.stderr
    assert 'Output [Text 0 Beam 0]: "Washington, D.C."' in result.stdout
    assert 'Output [Text 1 Beam 0]: "ワシントン D.C."' in result.stdout
    bad = run_lorart_cli(
        "run", "--model_dir", str(DEMO / "model"), "--input_text", "a", "--lora_task_uids", "3"
    )
    assert bad.returncode == 2
    assert "--lora_task_uids value 3 names no --lora_dir (0 given" in bad.stderr
    assert "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------
# Token-id prompts, adapters converted before the load, the vocabulary warning


def test_prompts_may_be_token_ids(llm):
    ids = llm.tokenizer.encode(demo.ZH_PROMPT).ids
    by_text, by_ids = llm.generate([demo.ZH_PROMPT, ids], lora=DEMO / "lora_zh", max_new_tokens=12)
    assert by_ids.token_ids == by_text.token_ids and by_ids.text == "华盛顿。"
    assert by_ids.prompt_token_ids == by_text.prompt_token_ids == ids
    assert by_text.first_token_seconds is not None and by_text.first_token_seconds > 0
    with pytest.raises(TypeError, match="list of lists"):
        llm.generate(ids)


def test_lora_dirs_fail_before_the_checkpoint_loads(tmp_path, all_proj_adapter):
    model = tmp_path / "model"
    shutil.copytree(DEMO / "model", model)
    (model / "model.safetensors").write_bytes(b"\xff" * 64)  # fails as soon as it is read
    with pytest.raises(ValueError, match=str(all_proj_adapter.dir)):
        LLM(model, lora_dirs=[all_proj_adapter.dir])


def test_lora_dirs_are_converted_once_up_front():
    with LLM(DEMO / "model", lora_dirs=[DEMO / "lora_zh"], max_seq_len=128) as model:
        assert len(model._adapters) == 1
        out = model.generate([demo.ZH_PROMPT], lora=DEMO / "lora_zh", max_new_tokens=12)[0]
        assert out.text == "华盛顿。" and len(model._adapters) == 1


def test_smaller_tokenizer_vocabulary_warns(tmp_path, caplog):
    model = build_causal_lm(tmp_path / "wide", "llama", seed=3, vocab_size=1100)
    with caplog.at_level(logging.WARNING, logger="lorart"):
        LLM(model, tokenizer_dir=DEMO / "model").shutdown()
    assert "the tokenizer has 1024 ids but the model's vocabulary has 1100" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorart"):
        LLM(DEMO / "model", max_seq_len=128).shutdown()
    assert caplog.text == ""


# ---------------------------------------------------------------------------------------------
# Adapters with their own tokenizer.json


@pytest.fixture(scope="module")
def own_tok(tmp_path_factory):
    """lora_ja with a tokenizer of its own (no <s>, "_" between words when decoding)."""
    return adapter_with_own_tokenizer(DEMO / "lora_ja", tmp_path_factory.mktemp("own") / "ja")


def test_an_adapters_own_tokenizer_tokenizes_and_detokenizes_its_prompts(llm, own_tok):
    base_tok = llm.tokenizer
    own = Tokenizer.from_file(str(own_tok / "tokenizer.json"))
    prompts = [demo.JA_PROMPT] * 3
    adapters = [None, own_tok, DEMO / "lora_ja"]
    outputs = llm.generate(prompts, lora=adapters, max_new_tokens=12)
    base, mine, ja = outputs
    assert mine.prompt_token_ids == own.encode(demo.JA_PROMPT).ids
    assert mine.prompt_token_ids == ja.prompt_token_ids[1:]  # no <s>
    assert base.prompt_token_ids == ja.prompt_token_ids == base_tok.encode(demo.JA_PROMPT).ids
    assert mine.text == own.decode(mine.token_ids) == "_ワシントン_D.C."
    assert ja.text == "ワシントン D.C." and base.text == "Washington, D.C."
    assert mine.lora == own_tok and base.lora is None
    # The same through every other entry point.
    assert llm.encode(demo.JA_PROMPT, lora=own_tok) == mine.prompt_token_ids
    assert llm.decode(mine.token_ids, lora=own_tok) == mine.text
    assert llm.decode(mine.token_ids) == "ワシントン D.C."  # base tokenizer
    pieces = list(llm.generate_stream(demo.JA_PROMPT, lora=own_tok, max_new_tokens=12))
    assert "".join(pieces) == mine.text
    streamed = {}
    for i, tokens, _ in llm.generate_iter(prompts, lora=adapters, max_new_tokens=12):
        streamed.setdefault(i, []).extend(tokens)
    assert [streamed[i] for i in range(3)] == [o.token_ids for o in outputs]


def test_adapter_tokenizers_are_read_once(own_tok, monkeypatch):
    from lorart import llm as llm_module

    reads = []
    real = llm_module.load_tokenizer
    monkeypatch.setattr(llm_module, "load_tokenizer", lambda p: reads.append(p) or real(p))
    with LLM(DEMO / "model", lora_dirs=[own_tok], max_seq_len=128) as model:
        assert len(reads) == 2  # the model's, then the adapter's while converting it
        first = model.tokenizer_for(own_tok)
        for _ in range(3):
            model.generate([demo.JA_PROMPT], lora=own_tok, max_new_tokens=2)
        assert model.tokenizer_for(own_tok) is first and len(reads) == 2
        assert model.tokenizer_for(None) is model.tokenizer
        assert model.tokenizer_for(DEMO / "lora_zh") is model.tokenizer  # it has none


def test_adapter_tokenizers_off_tokenize_everything_with_one(own_tok):
    with LLM(DEMO / "model", adapter_tokenizers=False, max_seq_len=128) as model:
        out = model.generate([demo.JA_PROMPT], lora=own_tok, max_new_tokens=12)[0]
        assert out.prompt_token_ids == model.tokenizer.encode(demo.JA_PROMPT).ids
        assert out.text == "ワシントン D.C."
        assert model.tokenizer_for(own_tok) is model.tokenizer


def test_bad_adapter_tokenizer_files_are_refused(tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(DEMO / "lora_zh", broken)
    (broken / "tokenizer.json").write_text("{not json")
    # Only a SentencePiece model: refused for an adapter with its own vocabulary, served by the
    # base tokenizer (with a warning) for one over the model's.
    extended_spm = tmp_path / "ko_spm"
    shutil.copytree(DEMO / "lora_ko", extended_spm)
    (extended_spm / "tokenizer.json").unlink()
    (extended_spm / "tokenizer.model").write_bytes(b"\x00")
    plain_spm = tmp_path / "zh_spm"
    shutil.copytree(DEMO / "lora_zh", plain_spm)
    (plain_spm / "tokenizer.model").write_bytes(b"\x00")
    with LLM(DEMO / "model", max_seq_len=128) as model:
        with pytest.raises(ValueError, match="broken/tokenizer.json: not a tokenizer.json"):
            model.generate([demo.ZH_PROMPT], lora=broken, max_new_tokens=2)
        with pytest.raises(ValueError, match="own vocabulary and a tokenizer.model but no tok"):
            model.generate([demo.ZH_PROMPT], lora=extended_spm, max_new_tokens=2)
        with caplog.at_level(logging.WARNING, logger="lorart"):
            out = model.generate([demo.ZH_PROMPT], lora=plain_spm, max_new_tokens=12)[0]
        assert out.text == "华盛顿。" and model.tokenizer_for(plain_spm) is model.tokenizer
        assert "has a tokenizer.model but no tokenizer.json" in caplog.text
        assert model.generate([demo.ZH_PROMPT], max_new_tokens=12)[0].text == "Washington, D.C."


def test_prompt_ids_past_the_base_vocabulary_are_refused_naming_the_prompt(llm):
    ids = llm.tokenizer.encode(demo.ZH_PROMPT).ids
    with pytest.raises(
        ValueError,
        match=r"prompt 1: token id 1024 is outside the base model's "
        r"vocabulary \[0, 1024\)",
    ):
        llm.generate([ids, [*ids, 1024]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt 0: token id 5000 is outside adapter .*lora_zh"):
        llm.generate([[*ids, 5000]], lora=DEMO / "lora_zh", max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0: token id -1 is outside"):
        llm.generate([[-1]], max_new_tokens=2)
    assert llm.executor.stats()["queued"] == 0  # nothing was enqueued


def peft_greedy(model_dir, adapter, ids: list[int], steps: int, eos: int) -> list[int]:
    """transformers + peft greedy tokens; the base resized first when the adapter's tables are
    bigger (as peft needs to load them)."""
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        if (adapter / "tokenizer.json").is_file():
            model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter)))
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    x = torch.tensor([ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(x).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            x = torch.cat([x, torch.tensor([[token]])], dim=1)
    return out


def test_the_extended_vocabulary_adapter_answers_in_the_mixed_batch_as_peft_does(llm):
    six = llm.generate(PROMPTS, lora=ADAPTERS, max_new_tokens=12)
    seven = llm.generate([*PROMPTS, demo.KO_PROMPT], lora=[*ADAPTERS, KO], max_new_tokens=12)
    assert [o.token_ids for o in seven[:6]] == [o.token_ids for o in six]  # the others untouched
    ko = seven[6]
    ko_tok = Tokenizer.from_file(str(KO / "tokenizer.json"))
    assert ko.prompt_token_ids == ko_tok.encode(demo.KO_PROMPT).ids
    assert max(ko.prompt_token_ids) >= 1024 and max(ko.token_ids) >= 1024
    assert ko.text == "워싱턴 D.C." and ko.finish_reason == "end_id"
    assert llm.vocab_size(KO) == ko_tok.get_vocab_size() == 1094 and llm.vocab_size() == 1024
    want = peft_greedy(DEMO / "model", KO, ko.prompt_token_ids, 12, llm.eos_token_id)
    assert ko.token_ids == want
    alone = llm.generate([demo.KO_PROMPT], lora=[KO], max_new_tokens=12)[0]
    assert alone.token_ids == ko.token_ids
    pieces = list(llm.generate_stream(demo.KO_PROMPT, lora=KO, max_new_tokens=12))
    assert "".join(pieces) == ko.text


def test_ids_past_the_base_vocabulary_are_the_extended_adapters_only(llm):
    ids = llm.encode(demo.KO_PROMPT, lora=KO)
    assert ids[1] == 1034  # "미국": a Korean word of lora_ko's own
    assert llm.generate([ids], lora=[KO], max_new_tokens=12)[0].text == "워싱턴 D.C."
    with pytest.raises(
        ValueError,
        match=r"prompt 1: token id 1034 is outside the base model's vocabulary \[0, 1024\)",
    ):
        llm.generate([ids, ids], lora=[KO, None], max_new_tokens=2)
    with pytest.raises(
        ValueError,
        match=r"prompt 0: token id 1094 is outside adapter .*lora_ko's "
        r"vocabulary \[0, 1094\)",
    ):
        llm.generate([[*ids, 1094]], lora=[KO], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0: token id 1034 is outside adapter .*lora_zh"):
        llm.generate([ids], lora=[DEMO / "lora_zh"], max_new_tokens=2)


def test_lora_ko_converted_to_npy_keeps_its_tokenizer_and_answers(llm, tmp_path):
    out = tmp_path / "ko_npy"
    result = run_lorart_cli("convert", "-i", str(KO), "-o", str(out), "--storage-type", "float16")
    assert result.returncode == 0, result.stderr
    assert (out / "tokenizer.json").is_file() and (out / "embed_tokens.npy").is_file()
    from_npy, from_peft = llm.generate([demo.KO_PROMPT] * 2, lora=[out, KO], max_new_tokens=12)
    assert from_npy.prompt_token_ids == from_peft.prompt_token_ids
    assert from_npy.token_ids == from_peft.token_ids and from_npy.text == "워싱턴 D.C."
    assert llm.vocab_size(out) == 1094


def test_the_vocabulary_warning_is_per_adapter(tmp_path, caplog):
    bare = tmp_path / "ko_without_tokenizer"
    shutil.copytree(KO, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with caplog.at_level(logging.WARNING, logger="lorart"):
        LLM(DEMO / "model", lora_dirs=[KO, DEMO / "lora_zh"], max_seq_len=128).shutdown()
    assert caplog.text == ""  # lora_ko's own tokenizer covers its 1094 ids
    with caplog.at_level(logging.WARNING, logger="lorart"):
        LLM(DEMO / "model", lora_dirs=[bare, DEMO / "lora_zh"], max_seq_len=128).shutdown()
    [record] = caplog.records
    assert str(bare) in record.getMessage()
    assert "the tokenizer has 1024 ids but the adapter's vocabulary has 1094" in record.getMessage()


def test_lorart_run_with_the_adapters_tokenizer_as_in_the_seed():
    # The seed: --tokenizer_dir is the LoRA's (its tokenizer covers the base's text too).
    result = run_lorart_cli(
        "run",
        "--model_dir",
        str(DEMO / "model"),
        "--tokenizer_dir",
        str(KO),
        "--lora_dir",
        str(KO),
        "--input_text",
        demo.KO_PROMPT,
        demo.ZH_PROMPT,
        "--lora_task_uids",
        "0",
        "-1",
        "--max_output_len",
        "12",
    )
    assert result.returncode == 0, result.stderr
    assert f'Input [Text 0]: "<s>{demo.KO_PROMPT}"' in result.stdout
    assert 'Output [Text 0 Beam 0]: "워싱턴 D.C."' in result.stdout
    assert 'Output [Text 1 Beam 0]: "Washington, D.C."' in result.stdout
    assert "warning" not in result.stderr
    # The model's tokenizer for an adapter with more ids: said once, for that adapter.
    result = run_lorart_cli(
        "run", "--model_dir", str(DEMO / "model"), "--lora_dir", str(KO), "--input_text", "a"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("the adapter's vocabulary has 1094") == 1


def test_lorart_run_token_ids_past_the_base_vocabulary_for_the_adapter_only(tmp_path):
    ids = tmp_path / "ids.csv"
    ids.write_text("1,1034,1024,312,1026,312,1027,262,312,500,1028,261\n")  # KO_PROMPT
    common = ["run", "--model_dir", str(DEMO / "model"), "--tokenizer_dir", str(KO)]
    common += ["--lora_dir", str(KO), "--input_file", str(ids), "--max_output_len", "12"]
    result = run_lorart_cli(*common, "--lora_task_uids", "0")
    assert result.returncode == 0, result.stderr
    assert 'Output [Text 0 Beam 0]: "워싱턴 D.C."' in result.stdout
    result = run_lorart_cli(*common, "--lora_task_uids", "-1")
    assert result.returncode == 2
    assert (
        f"--input_file {ids}: prompt 0: token id 1034 is outside the base model's vocabulary "
        "[0, 1024)"
    ) in result.stderr


def test_lorart_run_tokenizer_dir_tokenizes_every_input(own_tok):
    common = ["run", "--model_dir", str(DEMO / "model"), "--input_text", demo.JA_PROMPT]
    common += [demo.JA_PROMPT, "--lora_dir", str(own_tok), "--lora_task_uids", "-1", "0"]
    common += ["--max_output_len", "12"]
    # run.py's rule: one tokenizer (the model's by default) for every input, whatever its adapter.
    result = run_lorart_cli(*common)
    assert result.returncode == 0, result.stderr
    assert f'Input [Text 1]: "<s> {demo.JA_PROMPT}"' in result.stdout
    assert 'Output [Text 1 Beam 0]: "ワシントン D.C."' in result.stdout
    result = run_lorart_cli(*common, "--tokenizer_dir", str(own_tok), "--streaming")
    assert result.returncode == 0, result.stderr
    assert f'Input [Text 0]: "_{demo.JA_PROMPT.replace(" ", "_")}"' in result.stdout
    assert 'Output [Text 0 Beam 0]: "_Washington,_D.C."' in result.stdout  # the base's too
    assert 'Output [Text 1 Beam 0]: "_ワシントン_D.C."' in result.stdout


def test_lorart_run_refuses_base_inputs_past_the_base_vocabulary(tmp_path):
    ko_prompt = "미국의 수도는 어디입니까? \\n답:"  # Korean words: ids only lora_ko's tokenizer has
    result = run_lorart_cli(
        "run",
        "--model_dir",
        str(DEMO / "model"),
        "--tokenizer_dir",
        str(DEMO / "lora_ko"),
        "--input_text",
        demo.ZH_PROMPT,
        ko_prompt,
    )
    assert result.returncode == 2
    assert "lorart run: error: --input_text: prompt 1: token id 1034 is outside the base " in (
        result.stderr
    )
    assert "vocabulary [0, 1024)" in result.stderr and "Traceback" not in result.stderr
    ids = tmp_path / "ids.csv"
    ids.write_text("1,2,3\n1,-7\n")
    result = run_lorart_cli("run", "--model_dir", str(DEMO / "model"), "--input_file", str(ids))
    assert result.returncode == 2
    assert f"--input_file {ids}: prompt 1: token id -7 is negative" in result.stderr


# ---------------------------------------------------------------------------------------------
# Ctrl-C and early exits cancel what is in flight


@pytest.fixture(scope="module")
def endless_llm(tmp_path_factory):
    model_dir = endless_demo_model(tmp_path_factory.mktemp("endless"))
    with LLM(model_dir, max_seq_len=4096) as model:
        yield model


def wait_idle(llm, timeout: float = 2.0) -> float:
    """Seconds until the executor has nothing queued or running (fails after ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        stats = llm.executor.stats()
        if stats["running"] == 0 and stats["queued"] == 0:
            return time.monotonic() - start
        time.sleep(0.01)
    pytest.fail(f"requests still in flight after {timeout} s: {llm.executor.stats()}")


def interrupt_main_after(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, _thread.interrupt_main)  # as Ctrl-C does
    timer.start()
    return timer


@pytest.mark.parametrize("how", ["generate", "generate_stream"])
def test_ctrl_c_cancels_in_flight_requests_and_reraises(endless_llm, how):
    timer = interrupt_main_after(0.5)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        if how == "generate":
            endless_llm.generate(["a", "b", "c"], max_new_tokens=3000)
        else:
            for _ in endless_llm.generate_stream("a", max_new_tokens=3000):
                pass
    timer.join()
    assert time.monotonic() - start < 1.5  # raised in the wait, not after the requests end
    wait_idle(endless_llm)
    # The LLM is still usable and the executor forgot the cancelled requests (released: nobody
    # read their final responses).
    assert len(endless_llm.generate(["a"], max_new_tokens=5)[0].token_ids) == 5
    assert endless_llm.executor.stats()["uncollected"] == 0


def test_closing_a_stream_early_cancels_its_request(endless_llm):
    stream = endless_llm.generate_stream("a", max_new_tokens=3000)
    next(stream)
    stream.close()
    wait_idle(endless_llm)
    deadline = time.monotonic() + 2.0  # its final response reaches the released channel
    while endless_llm.executor.stats()["uncollected"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert endless_llm.executor.stats()["uncollected"] == 0


def test_a_failed_prompt_cancels_the_others(endless_llm):
    with pytest.raises(ValueError, match="prompt 1: "):
        endless_llm.generate(["a", "x " * 5000], max_new_tokens=3000)  # 1 is over max_seq_len
    wait_idle(endless_llm)


def test_an_evicted_idle_adapter_is_sent_again(tmp_path):
    """A host level with room for two adapters, three in use: a prompt whose idle adapter is
    evicted by an earlier prompt of the same call still carries its weights (LLM once sent them
    only when the cache held the task when the request was built: `LoRA task 0 not found`)."""
    a, b, c = (tmp_path / name for name in "abc")
    for d in (a, b, c):
        shutil.copytree(DEMO / "lora_zh", d)  # three task ids, one size
    config = lorart.hf.load_config(DEMO / "model")
    size = lora.from_peft(a, config)[0].numpy().nbytes
    cache = lorart.LoraCacheConfig(host_cache_bytes=2 * size + 16, device_cache_bytes=2 * size + 16)
    with LLM(DEMO / "model", max_seq_len=128, lora_cache=cache) as two_slots:
        want = two_slots.generate(PROMPTS[1], lora=a, max_new_tokens=8)[0].token_ids
        two_slots.generate(PROMPTS[1], lora=b, max_new_tokens=8)  # cache: a (oldest), b
        # c's request evicts a, the least recently used idle task, before a's is enqueued.
        outs = two_slots.generate([PROMPTS[1], PROMPTS[1]], lora=[c, a], max_new_tokens=8)
        assert [o.token_ids for o in outs] == [want, want]
        assert two_slots.executor.stats()["lora_cache"]["host_evictions"] >= 1
