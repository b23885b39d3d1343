"""One experiment per figure and table of the paper: every configs/experiment/paper_*.yaml and scaling_*.yaml
lists the models, revisions and eval sets of Table 3, appendix A.2.1 and Table 4 (written down here from the
paper); `family_of` agrees with Table 4; `non_embedding_params` gives Table 4's counts on the meta device for the
published Pythia, GPT-2 and OPT shapes; replay rows carry family, bits per byte and the eval pin's hash."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from hub_cache import HubCache, offline_hub, tiny_hub  # noqa: F401 - tiny_hub is a fixture

from ce_dynamics.runs.config import load_config
from ce_dynamics.analysis.scaling import family_of, non_embedding_params

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

PAPER_SETS = ["wikipedia", "c4", "pile_github"]
# Table 3: figure -> (eval sets, models, revisions)
TABLE_3 = {
    "paper_fig3": (PAPER_SETS, ["pythia-160m", "pythia-410m", "pythia-1b"], [0, 16, 128, 1000, 10000, 100000]),
    "paper_fig4": (["wikipedia"], ["pythia-160m"], [0, 128, 10000]),
    "paper_fig5": (["wikipedia"], ["pythia-70m"], [32000]),
    "paper_fig6": (["wikipedia"], ["pythia-410m"], [0, 16, 128, 10000]),
}
# Appendix A.2.1, in the paper's order (increasing non-embedding parameters)
QUALITATIVE = ["pythia-14m", "distilgpt2", "gpt2", "pythia-160m", "pythia-410m", "qwen2.5-0.5b", "opt-1.3b", "gpt2-xl",
               "llama-3.2-1b", "qwen2.5-3b", "llama-3.2-3b", "mistral-7b-v0.1", "opt-6.7b", "llama-2-13b-hf",
               "qwen2.5-14b", "llama-2-70b-hf"]
# Table 4: model -> (family, non-embedding parameters)
TABLE_4 = {
    "openai-gpt": ("gpt-1/2", 85_054_464), "gpt2": ("gpt-1/2", 85_056_000), "gpt2-medium": ("gpt-1/2", 302_311_424),
    "gpt2-large": ("gpt-1/2", 708_390_400), "gpt2-xl": ("gpt-1/2", 1_475_561_600),
    "opt-125m": ("opt", 85_056_000), "opt-350m": ("opt", 303_357_952), "opt-1.3b": ("opt", 1_208_602_624),
    "opt-2.7b": ("opt", 2_517_652_480), "opt-6.7b": ("opt", 6_444_163_072),
    "qwen2.5-0.5b": ("qwen", 357_898_112), "qwen2.5-1.5b": ("qwen", 1_310_340_608), "qwen2.5-3b": ("qwen", 2_774_773_760),
    "qwen2.5-7b": ("qwen", 6_525_621_760), "qwen2.5-14b": ("qwen", 13_212_898_304), "qwen2.5-72b": ("qwen", 70_214_787_072),
    "pythia-14m": ("pythia", 1_189_888), "pythia-31m": ("pythia", 4_739_072), "pythia-70m": ("pythia", 18_915_328),
    "pythia-160m": ("pythia", 85_056_000), "pythia-410m": ("pythia", 302_311_424), "pythia-1.4b": ("pythia", 1_208_602_624),
    "pythia-2.8b": ("pythia", 2_517_652_480), "pythia-6.9b": ("pythia", 6_444_163_072),
    "llama-3.2-1b": ("llama", 973_146_112), "llama-3.2-3b": ("llama", 2_818_747_392), "llama-7b": ("llama", 6_476_271_616),
    "meta-llama-3-8b": ("llama", 6_979_588_096), "llama-2-13b-hf": ("llama", 12_688_184_320),
    "llama-2-70b-hf": ("llama", 68_452_360_192), "mistral-7b-v0.1": ("mistral", 6_979_588_096),
    "distilgpt2": ("others", 42_528_768),
}


def names(models) -> list[str]:
    return [str(m).rsplit("/", 1)[-1].lower() for m in models]


@pytest.mark.parametrize("experiment", sorted(TABLE_3))
def test_figure_experiments_follow_table_3(experiment: str) -> None:
    sets, models, revisions = TABLE_3[experiment]
    cfg = load_config([f"experiment={experiment}"])
    assert cfg.mode == "replay" and list(cfg.data.eval_sets) == sets
    assert names(cfg.replay.models) == models and all(m.startswith("EleutherAI/") for m in cfg.replay.models)
    assert list(cfg.replay.revisions) == revisions
    assert (cfg.data.seq_len, cfg.data.eval_sequences) == (512, 1000)  # appendix A.1: 1000 instances of 512 tokens


def test_scaling_experiments_list_appendix_a21_and_table_4_at_final_revisions() -> None:
    qualitative = load_config(["experiment=scaling_qualitative"])
    assert names(qualitative.replay.models) == QUALITATIVE
    paper = load_config(["experiment=scaling_paper"])
    assert sorted(names(paper.replay.models)) == sorted(TABLE_4) and len(paper.replay.models) == 32
    for cfg in (qualitative, paper):
        assert list(cfg.replay.revisions) == ["main"] and list(cfg.data.eval_sets) == PAPER_SETS
        assert (cfg.data.seq_len, cfg.data.eval_sequences) == (512, 1000)
    for model in paper.replay.models:
        assert family_of(model) == TABLE_4[names([model])[0]][0], model


@pytest.mark.parametrize("experiment", ["pythia14m", "pythia70m", "pythia160m", "pythia410m", "pythia1b"])
def test_pythia_experiments_evaluate_on_the_papers_sets_and_tiny_keeps_the_built_in_ones(experiment: str) -> None:
    assert list(load_config([f"experiment={experiment}"]).data.eval_sets) == PAPER_SETS
    for built_in in ("tiny", "tiny_scaling"):
        assert list(load_config([f"experiment={built_in}"]).data.eval_sets) == ["code", "prose"]


# ------------------------------------------------------------------------ Table 4 on the meta device

PYTHIA = {"pythia-14m": (128, 6, 4), "pythia-31m": (256, 6, 8), "pythia-70m": (512, 6, 8), "pythia-160m": (768, 12, 12),
          "pythia-410m": (1024, 24, 16), "pythia-1.4b": (2048, 24, 16), "pythia-2.8b": (2560, 32, 32),
          "pythia-6.9b": (4096, 32, 32)}  # (hidden, layers, heads) of EleutherAI/pythia-*/config.json
GPT2 = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25),
        "distilgpt2": (768, 6, 12)}
OPT = {"opt-125m": (768, 12, 12), "opt-350m": (1024, 24, 16), "opt-1.3b": (2048, 24, 32), "opt-2.7b": (2560, 32, 32),
       "opt-6.7b": (4096, 32, 32)}


def build_on_meta(name: str) -> torch.nn.Module:
    import transformers as tf

    with torch.device("meta"):
        if name in PYTHIA:
            h, layers, heads = PYTHIA[name]
            return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
                vocab_size=50432 if name == "pythia-6.9b" else 50304, hidden_size=h, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=4 * h, rotary_pct=0.25, max_position_embeddings=2048,
                tie_word_embeddings=False))
        if name == "openai-gpt":
            return tf.OpenAIGPTLMHeadModel(tf.OpenAIGPTConfig(vocab_size=40478, n_positions=512, n_embd=768,
                                                              n_layer=12, n_head=12))
        if name in GPT2:
            h, layers, heads = GPT2[name]
            return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=h, n_layer=layers,
                                                    n_head=heads))
        h, layers, heads = OPT[name]
        return tf.OPTForCausalLM(tf.OPTConfig(
            vocab_size=50272, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * h,
            max_position_embeddings=2048, word_embed_proj_dim=512 if name == "opt-350m" else h,
            do_layer_norm_before=name != "opt-350m"))


@pytest.mark.parametrize("name", [*PYTHIA, "openai-gpt", *GPT2, *OPT])
def test_non_embedding_params_match_table_4_on_the_meta_device(name: str) -> None:
    model = build_on_meta(name)
    assert next(model.parameters()).device.type == "meta"
    assert non_embedding_params(model) == TABLE_4[name][1]


# ------------------------------------------------------------------------------------ replay rows


def test_replay_rows_carry_family_bits_per_byte_and_the_pin_hash(tiny_hub: HubCache, tmp_path: Path) -> None:
    """A replay of the hub's `main` revision on a pinned local json set and the built-in prose set."""
    from ce_dynamics.runs import pinning
    from ce_dynamics.runs.replay import read_results

    local = tmp_path / "docs.jsonl"
    local.write_text("".join(json.dumps({"text": f"Entry {i}. " + "Plain words follow. " * (1 + i % 4)}) + "\n"
                             for i in range(30)))
    out = tmp_path / "out"
    with offline_hub(tiny_hub.root):
        code = train.main([
            "mode=replay", f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32",
            "data.eval_sequences=4", "data.batch_size=4", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "logger.wandb.mode=disabled", f"replay.models=[{tiny_hub.hub_id}]",
            "replay.revisions=[main]", "data.eval.local.source=hf", "data.eval.local.path=json",
            f"data.eval.local.data_files={local}", "data.eval_sets=[local,prose]",
        ])
    assert code == 0
    rows = read_results(out / "results.jsonl")
    (pin_file,) = (tmp_path / "cache" / "eval_pins").iterdir()
    # main points at step4's commit: recorded at that step (docs/guide/replay.md)
    assert [(r["revision"], r["step"], r["dataset"]) for r in rows] == [("main", 4, "local"), ("main", 4, "prose")]
    assert [r["eval_hash"] for r in rows] == [pinning.read_pin(pin_file).hash, None]
    for row in rows:
        assert row["family"] == family_of(tiny_hub.hub_id) == "tiny"
        assert row["num_bytes"] > 0
        for key in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
            assert row[f"{key}_bpb"] == pytest.approx(row[key] * row["num_tokens"] / row["num_bytes"] / math.log(2))
    local_row = rows[0]
    assert local_row["num_tokens"] < 4 * 31  # one instance per document, padding not scored
