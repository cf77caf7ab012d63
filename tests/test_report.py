"""report.md a person can read: a header saying what ran on what (data, clips per split and machine, the detector
by its name, version, date, host), a compact table per split with the evaluator's wide table linked, the settings
that differ from the defaults, and the evaluator's ci95 said to be what it is."""

import re
from importlib.metadata import version

from markdown_it import MarkdownIt

from asd_ray.config import RunConfig, load_config
from asd_ray.detect import reference_run
from asd_ray.report import changed_settings, timing_lines
from tiny import TINY


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_report_header_compact_tables_and_changed_settings(tiny_corpus, tmp_path):
    config = load_config(RunConfig, None, ["detector=knn", "bank.k=5"])
    out = tmp_path / "knn-k5"
    reference_run([tiny_corpus], config, out)
    text = (out / "report.md").read_text()
    train, test = TINY["train_source"] + TINY["train_target"], 4 * TINY["test_per_cell"]
    assert text.startswith("# asd-ray report: knn-k5\n")
    header = text.split("\n## ", 1)[0]
    assert f"| data | `{tiny_corpus}` |" in header
    assert f"dev_data: ToyCar {train} + {test}, valve {train} + {test}; eval_data: ToyPet {train} + {test}" in header
    assert "| detector | `knn`: clip k-NN bank over backbone embeddings; features: backbone `logmel` |" in header
    assert f"| version | asd-ray {version('asd-ray')}" in header
    assert re.search(r"\| written \| \d{4}-\d\d-\d\d \d\d:\d\d UTC on .+ \(.+, \d+ CPUs\) \|", header)

    dev = section(text, "dev_data")
    assert "| machine | AUC_s | AUC_t | pAUC | h-mean |" in dev
    rows = [line for line in dev.splitlines() if line.startswith("| ToyCar |")]
    assert len(rows) == 1 and len(rows[0].strip("|").split("|")) == 5  # machine + 4 numbers, nothing wider
    link = f"evaluator/dev_data/{out.name}_result.csv"
    assert f"[{link}]({link})" in dev and (out / link).is_file()
    assert "not a confidence interval of the official score" in dev
    assert "MemoryBank" not in dev and "F1 score (source)" not in dev

    settings = section(text, "Settings")
    assert "| `bank.k` | `5` | `3` |" in settings and "| `detector` | `knn` | `fusion` |" in settings
    assert "preprocess" not in settings and "```json" not in text  # no dump of every default
    assert "fitting banks and scoring" in section(text, "Timings") and "fit_score" not in text

    # rendered as a reader sees it: a title, tables that are tables, figures that exist
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert html.startswith("<h1>asd-ray report: knn-k5</h1>")
    assert "<th>machine</th>\n<th>AUC_s</th>\n<th>AUC_t</th>\n<th>pAUC</th>\n<th>h-mean</th>" in html
    assert "<td>data</td>" in html and "|" not in re.sub(r"<code>.*?</code>", "", html.split("<h2>Settings</h2>")[0])
    images = re.findall(r'<img src="([^"]+)"', html)
    assert "overview.png" in images and "plot_ToyCar.png" in images
    assert all((out / image).read_bytes().startswith(b"\x89PNG") for image in images)


def test_changed_settings_and_timings_read_as_words():
    assert changed_settings(RunConfig()) == []
    config = load_config(RunConfig, None, ["fusion.members=[local]", "serve.port=9000"])
    assert changed_settings(config) == [("serve.port", 9000, 8000), ("fusion.members", ["local"], [])]
    (_, _, line, _) = timing_lines({"discover": 1.0, "embed": 2.0, "score_evaluate": 5.0, "fit_score": 4.0})
    assert line == "finding the clips 1.0 s, embedding 2.0 s, fitting banks and scoring 4.0 s, metrics 1.0 s."
