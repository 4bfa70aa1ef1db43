"""README.md runs top to bottom: every Python block (in order, in one namespace, as a reader pasting them into one
session would), every `jaxnn ...` line of its shell blocks (through the CLI's own entry point, in the same process)
and its YAML files (a block whose first line is `# NAME.yaml` is written to NAME.yaml), in a scratch folder whose
neighbour ../shared/data holds the data README's lines name. The first step that fails fails the test, naming its
README line.

Smoke sizes and what cannot run here are stated in the README itself, in an HTML comment (not rendered) on the line
before a block: ``<!-- readme-test: {"smoke": {"num_steps=600": "num_steps=40"}} -->`` replaces text in that block
(each replacement must match, so the comment follows the block's edits), ``{"skip": "why"}`` leaves the block out,
``{"skip_lines": {"text": "why"}}`` the lines that contain the text. `jaxnn run`/`train`/`sweep` lines train for
20 steps (30 when they resume), the notebooks' smoke size."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent
DIRECTIVE = re.compile(r"<!-- readme-test: (\{.*\}) -->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SMOKE_STEPS = ["--set", "train.steps=20", "--set", "train.eval_every=10", "--set", "train.progress=false"]

DRIVER = """
import json, sys, time, traceback


def run(plan):
    import matplotlib
    matplotlib.use("Agg")
    from jaxnn.cli import main
    namespace = {"__name__": "__readme__"}
    for step in json.load(open(plan)):
        where = f"README.md line {step['line']}"
        started = time.perf_counter()
        try:
            if step["kind"] == "python":
                exec(compile(step["code"], where, "exec"), namespace)
            elif step["kind"] == "file":
                open(step["name"], "w").write(step["code"])
            else:
                code = main(step["argv"])
                assert code == 0, f"exit status {code}"
        except BaseException:
            sys.stderr.write(f"{where} failed: {step.get('argv') or step['code'][:200]}\\n")
            traceback.print_exc()
            sys.exit(1)
        print(f"README-STEP {where}: {time.perf_counter() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":  # the figure worker's process imports this module: it must not run the steps again
    run(sys.argv[1])
"""


def readme_steps(text: str) -> list[dict]:
    """The README's runnable steps in order, with their smoke replacements applied."""
    steps = []
    for match in FENCE.finditer(text):
        language, body = match.group(1), match.group(2)
        line = text.count("\n", 0, match.start()) + 2  # the block's first line
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        directive = json.loads(DIRECTIVE.match(before).group(1)) if DIRECTIVE.match(before) else {}
        if "skip" in directive:
            continue
        for old, new in directive.get("smoke", {}).items():
            assert old in body, f"README.md line {line}: the smoke replacement {old!r} no longer matches its block"
            body = body.replace(old, new)
        skipped = directive.get("skip_lines", {})
        if language == "python":
            steps.append({"kind": "python", "code": body, "line": line})
        elif language == "yaml" and body.startswith("# ") and ".yaml" in body.split("\n", 1)[0]:
            steps.append({"kind": "file", "name": body.split()[1].rstrip(":"), "code": body, "line": line})
        elif language == "bash":
            for offset, command in enumerate(body.splitlines()):
                argv = shlex.split(command, comments=True)
                if not argv or argv[0] != "jaxnn" or any(text_ in command for text_ in skipped):
                    continue
                argv = argv[1:]
                if argv[0] in ("run", "train", "sweep"):
                    resumes = "--resume" in argv and argv[0] != "sweep"  # 10 steps past the run it continues
                    argv += [a.replace("steps=20", "steps=30") if resumes else a for a in SMOKE_STEPS]
                steps.append({"kind": "cli", "argv": argv, "line": line + offset})
    return steps


def test_every_step_of_the_readme_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    steps = readme_steps(text)
    assert sum(s["kind"] == "python" for s in steps) >= 10 and sum(s["kind"] == "cli" for s in steps) >= 10
    work = tmp_path / "work"
    work.mkdir()
    shared = pathlib.Path(os.environ.get("JAXNN_DATA", ROOT.parent / "shared" / "data"))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared.absolute())  # README's ../shared/data/mnist
    plan = tmp_path / "steps.json"
    plan.write_text(json.dumps(steps))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "JAXNN_DATA": str(shared.absolute())}
    done = subprocess.run([sys.executable, str(driver), str(plan)], cwd=work, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-5000:]
    assert (work / "runs" / "digits_mlp" / "version_2" / "curvature.json").exists()  # `jaxnn run` twice, no refusal


def test_directives_are_checked():
    text = "<!-- readme-test: {\"smoke\": {\"600\": \"6\"}} -->\n```python\nfit(num_steps=600)\n```\n" \
           "<!-- readme-test: {\"skip\": \"needs a GPU\"} -->\n```bash\njaxnn train big\n```\n" \
           "```bash\njaxnn curvature runs/x --k 5   # a comment\nsrun jaxnn train x\njaxnn train a  # b\n```\n"
    steps = readme_steps(text)
    assert steps[0] == {"kind": "python", "code": "fit(num_steps=6)\n", "line": 3}
    assert [s["argv"] for s in steps[1:]] == [["curvature", "runs/x", "--k", "5"], ["train", "a", *SMOKE_STEPS]]
    stale = "<!-- readme-test: {\"smoke\": {\"700\": \"6\"}} -->\n```python\nfit(num_steps=600)\n```\n"
    try:
        readme_steps(stale)
    except AssertionError as error:
        assert "no longer matches" in str(error)
    else:
        raise AssertionError("a stale smoke replacement was not noticed")
