"""`aiflow validate`, `aiflow render` and `aiflow operator` from the command line."""

import pytest
import yaml

from aiflow.cli import main
from aiflow.controller.apply import unchanged
from tests.operator.conftest import NS, ROOT

CAPTIONING = ROOT / "examples" / "captioning.yaml"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_ok(capsys):
    code, out, _ = run(capsys, "validate", "-f", str(CAPTIONING))
    assert code == 0 and out.strip() == "AIFlow captioning: OK"


def test_validate_prints_every_problem_and_fails(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CAPTIONING.read_text().replace("tier: edge", "tier: fog").replace("model: caption_verifier", "model: nope"))
    code, out, _ = run(capsys, "validate", "-f", str(bad))
    assert code == 1
    assert "2 problems" in out
    assert "spec.stages[1].tier: 'fog' is not allowed" in out and "spec.stages[2].model: unknown model 'nope'" in out


def test_validate_with_nodes_checks_tiers(capsys, tmp_path):
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("tiers: {device: 1, edge: 0, cloud: 2}\n")
    code, out, _ = run(capsys, "validate", "-f", str(CAPTIONING), "--nodes", str(nodes))
    assert code == 1 and "aiflow.io/tier=edge" in out


@pytest.mark.parametrize("content, message", [
    ("a: [", "not valid YAML"),
    ("", "holds no manifest"),
])
def test_unreadable_input_is_a_clear_error(capsys, tmp_path, content, message):
    path = tmp_path / "flow.yaml"
    path.write_text(content)
    code, _, err = run(capsys, "validate", "-f", str(path))
    assert code == 2 and message in err


def test_missing_file_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "render", "-f", str(tmp_path / "nope.yaml"))
    assert code == 2 and "cannot read" in err


def test_render_prints_the_objects_as_multi_document_yaml(capsys, tmp_path):
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(yaml.safe_dump([{"kind": "Node", "metadata": {"name": "e", "labels": {"aiflow.io/tier": "edge"}}}]))
    code, out, _ = run(capsys, "render", "-f", str(ROOT / "examples" / "auto-placement.yaml"), "--nodes", str(nodes),
                       "--namespace", "team")
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Service", "Deployment"] * 3
    assert {d["metadata"]["namespace"] for d in docs} == {"team"}
    assert {d["spec"]["template"]["spec"]["nodeSelector"]["aiflow.io/tier"] for d in docs if d["kind"] == "Deployment"} == {"edge"}


def test_render_refuses_an_invalid_flow(capsys, tmp_path):
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("tiers: {cloud: 1}\n")
    code, out, err = run(capsys, "render", "-f", str(CAPTIONING), "--nodes", str(nodes))
    assert code == 2 and out == "" and "nothing rendered" in err and "tier device" in err


def test_operator_command_parses_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["operator", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--all-namespaces" in out and "--liveness" in out and "--peering" in out


def test_render_prints_exactly_what_the_operator_applies(cluster, capsys, tmp_path):
    cluster.apply(CAPTIONING)
    cluster.wait(lambda: len(cluster.children("captioning")) == 3 and cluster.children("captioning", "poddisruptionbudgets"),
                 message="3 deployments and the verifier's disruption budget")
    stored = tmp_path / "stored.yaml"
    stored.write_text(cluster.api.kubectl("get", "af", "captioning", "-n", NS, "-o", "yaml").stdout)
    code, out, _ = run(capsys, "render", "-f", str(stored))
    assert code == 0
    rendered = list(yaml.safe_load_all(out))
    live = {**{("Deployment", n): o for n, o in cluster.children("captioning").items()},
            **{("Service", n): o for n, o in cluster.children("captioning", "services").items()},
            **{("PodDisruptionBudget", n): o for n, o in cluster.children("captioning", "poddisruptionbudgets").items()}}
    assert sorted(live) == sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    for obj in rendered:
        current = live[(obj["kind"], obj["metadata"]["name"])]
        assert unchanged(obj, current)
        # and nothing the operator set is missing from the dry run
        assert current["metadata"]["labels"] == obj["metadata"]["labels"]
