"""Deployments on the real Prefect server: `pruneflow deploy` onto a process work pool with two workers, a run
triggered through the REST API with overrides, and a sweep fanned out over the two workers (two points: the
smallest grid that shows two workers running at once)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import interruptible

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("stack")]  # one worker starts the stack
POOL = "pruneflow-test"


def api(env, path, body=None, method=None, attempts=6):
    """One Prefect REST call, retried like Prefect's own client does: on 429/502/503 with backoff. The SQLite
    server answers 503 when its database is momentarily locked (two workers polling, a flow writing)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(env["PREFECT_API_URL"] + path, data=data, method=method or
                                     ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json"})
    for attempt in range(attempts):
        try:
            return json.loads(urllib.request.urlopen(request, timeout=30).read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code not in (429, 502, 503) or attempt == attempts - 1:
                raise
            time.sleep(min(2 ** attempt, 10))


def wait_for(env, flow_run_id, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run_ = api(env, f"/flow_runs/{flow_run_id}")
        if run_["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run_
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s")


@pytest.fixture(scope="module")
def pool(stack, project_on_stack):
    """`pruneflow deploy` onto a new pool (it creates it, a process pool) served by two workers (one flow run each)."""
    from pruneflow.infra.stack import client_env

    env = {**os.environ, **client_env(stack[1]), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    deploy = [sys.executable, "-m", "pruneflow.cli", "deploy", "--pool", POOL, "--repo", str(project_on_stack)]
    for attempt in range(2):  # the pool does not exist yet: the first deploy creates it (a process pool), once
        deployed = subprocess.run(deploy, env=env, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0 and "Traceback" not in deployed.stderr, deployed.stderr[-3000:]
        assert (f"created work pool '{POOL}' (type process)" in deployed.stderr) == (attempt == 0), deployed.stderr
    created = api(env, f"/work_pools/{POOL}")
    assert created["type"] == "process" and created["base_job_template"]["job_configuration"]
    logs = project_on_stack.parent / "workers"
    logs.mkdir(exist_ok=True)
    workers = [subprocess.Popen([prefect, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1",
                                 "--name", f"worker-{i}"], env=env, start_new_session=True, preexec_fn=interruptible,
                                stdout=open(logs / f"worker-{i}.log", "w"), stderr=subprocess.STDOUT)
               for i in range(2)]
    try:
        yield env, project_on_stack
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=60)


@pytest.fixture(scope="module")
def project_on_stack(tmp_path_factory, tiny_checkpoint, calibration_txt):
    """The `project` checkout, module-scoped (the deployments and workers live for the whole module)."""
    from tests.conftest import make_project

    return make_project(tmp_path_factory.mktemp("deployed"), tiny_checkpoint, calibration_txt)


def test_a_deployment_run_triggered_through_the_api_with_overrides_completes(pool, stack):
    from mlflow import MlflowClient

    from pruneflow.pipeline.params import load_params

    env, project = pool
    deployment = api(env, "/deployments/name/pruneflow/pruneflow")
    assert deployment["work_pool_name"] == POOL
    assert deployment["parameters"]["params"] == load_params(project / "params.yaml").model_dump()  # the form
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    params = load_params(project / "params.yaml", ["prune.ratio=0.3"]).model_dump()
    created = api(env, f"/deployments/{deployment['id']}/create_flow_run",
                  {"name": "api-run", "parameters": {"params": params}})
    finished = wait_for(env, created["id"])
    assert finished["state_type"] == "COMPLETED", finished["state"]
    client = MlflowClient(stack[1]["mlflow"]["url"])
    (parent,) = client.search_runs([client.get_experiment_by_name("pruneflow").experiment_id],
                                   f"tags.`prefect.flow_run_id` = '{created['id']}'")
    assert parent.data.params["prune.ratio"] == "0.3" and parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["calibrate", "evaluate", "export", "prune", "recover",
                                                          "score", "source"]


def test_a_sweep_runs_on_the_two_workers_at_once_and_builds_one_table(pool, stack):
    env, project = pool
    proc = subprocess.run([sys.executable, "-m", "pruneflow.cli", "sweep", "--methods", "wanda_sp,magnitude",
                           "--ratios", "0.2", "--params", str(project / "params.yaml"), "--name", "grid"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    labels = {"wanda_sp-0.2", "magnitude-0.2"}
    assert {label for label in labels for row in rows if row.startswith(f"| {label} recovered")} == labels
    points = api(env, "/flow_runs/filter", {"flow_runs": {"name": {"like_": "grid-"}}})
    assert len(points) == 2 and all(p["state_type"] == "COMPLETED" for p in points)
    ran_on = {p["work_pool_name"] for p in points}
    assert ran_on == {"pruneflow-test"}
    overlap = _overlapping(points)
    assert overlap, "the two workers never ran points at the same time"
    artifacts = api(env, "/artifacts/filter", {"artifacts": {"key": {"any_": ["sweep-comparison"]}}})
    assert artifacts and "wanda_sp-0.2 recovered" in artifacts[0]["data"]
    from mlflow import MlflowClient

    client = MlflowClient(stack[1]["mlflow"]["url"])
    (sweep_run,) = client.search_runs([client.get_experiment_by_name("pruneflow").experiment_id],
                                      "attributes.run_name = 'grid'")
    assert "comparison.md" in [a.path for a in client.list_artifacts(sweep_run.info.run_id)]


def _overlapping(runs) -> bool:
    spans = sorted((r["start_time"], r["end_time"]) for r in runs)
    return any(later_start < end for (_, end), (later_start, _) in zip(spans, spans[1:]))


def _field(session, section: str | None, label: str):
    """The input of the form property ``label`` (inside the ``section`` property when given). Prefect's schema
    form: a div per property holding its label and a body with its input; nested properties inside it."""
    prop = lambda name: (f"div[contains(@class,'schema-form-property')][./div/label//span[normalize-space()="  # noqa: E731
                         f"'{name} (Optional)']]")
    card = "" if section is None else f"//{prop(section)}"
    return session.find_element("xpath", f"({card}//{prop(label)}/div[contains(@class,'p-label__body')]"
                                         f"//*[self::input or self::select or self::textarea])[1]")


def _submit(session, env, name: str, attempts: int = 4):
    """Click the run form's Submit and return the flow runs called ``name`` once the server has one. Prefect's
    SQLite server answers 503 ("retry") when a request meets its database locked (two workers polling each
    second); its Python client retries, the UI shows "Oops. Something went wrong." and leaves the form as it
    was. Only then — the browser's console shows the 503 of the form's own call — submit again, like a user;
    any other outcome fails with the page, its console and a screenshot."""
    from tests.integration import browser

    calls = ("/create_flow_run ", "/ui/schemas/validate ")  # the form's calls (validate: its schema check)

    def outcome(s):
        runs = api(env, "/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
        if runs:
            return runs
        failed = any(" 503 " in line and any(call in line for call in calls)
                     for line in browser.read_console(s)[seen:])
        return "retry" if failed and s.current_url.endswith("/run") else None

    for attempt in range(attempts):
        seen = len(browser.read_console(session))
        submit = session.find_element("xpath", "//button[@type='submit'][normalize-space()='Submit']")
        if attempt:  # after a backoff like Prefect's client's; the error toast may sit over the button
            time.sleep(2 ** attempt)
            session.execute_script("arguments[0].click()", submit)
        else:
            submit.click()
        result = browser.wait(session, outcome, "the flow run the form created", timeout=120)
        if result != "retry":
            return result
    pytest.fail(f"the server answered 503 to {attempts} submissions; {browser.snap(session, 'submit-503')}")


GATES_ANY_MODEL_PASSES = {"Max Ppl Ratio": "1000", "Min Task Ratio": "0.001", "Ratio Tolerance": "0.9"}


def test_the_run_form_in_a_real_browser_starts_a_run_with_the_ratio_typed_in(pool, stack, tmp_path):
    """Chromium opens the deployment's run form on the stack's (non-default) Prefect port: the params fields
    show the project's params.yaml, score.method is a choice of every method; prune.ratio is changed, the
    form submitted (with gates any model passes), a worker runs it, MLflow records that ratio, and MLflow's UI shows the champion alias."""
    from mlflow import MlflowClient
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select

    from pruneflow.methods import METHODS
    from tests.integration import browser

    env, project = pool
    prefect_url, mlflow_url = stack[1]["prefect"]["url"], stack[1]["mlflow"]["url"]
    deployment = api(env, "/deployments/name/pruneflow/pruneflow")
    session = browser.start(tmp_path / "screenshots")
    try:
        session.get(f"{prefect_url}/deployments/deployment/{deployment['id']}/run")
        model = browser.wait(session, lambda s: _field(s, None, "Model"), "the run form")
        assert model.get_attribute("value") == "models/tiny", browser.snap(session, "form")
        method = Select(_field(session, "Score", "Method"))
        assert method.first_selected_option.text.strip() == "wanda_sp", browser.snap(session, "form")
        assert {o.text.strip() for o in method.options} >= set(METHODS), browser.snap(session, "form")
        assert _field(session, "Calibrate", "N Windows").get_attribute("value") == "4", browser.snap(session, "form")
        ratio = _field(session, "Prune", "Ratio")
        assert ratio.get_attribute("value") == "0.25", browser.snap(session, "form")
        ratio.send_keys(Keys.CONTROL, "a")
        ratio.send_keys("0.3")
        for label, value in GATES_ANY_MODEL_PASSES.items():  # the tiny random model would not be promoted
            gate = _field(session, "Evaluate", label)
            gate.send_keys(Keys.CONTROL, "a")
            gate.send_keys(value)
        name = session.find_element("css selector", ".flow-run-name-input input")
        name.send_keys(Keys.CONTROL, "a")
        name.send_keys("from-the-browser")
        browser.snap(session, "form-filled")
        runs = _submit(session, env, "from-the-browser")
        assert len(runs) == 1 and runs[0]["deployment_id"] == deployment["id"]
        flow_run_id = runs[0]["id"]
        finished = wait_for(env, flow_run_id)
        session.get(f"{prefect_url}/flow-runs/flow-run/{flow_run_id}")
        browser.wait(session, lambda s: "Completed" in s.find_element("tag name", "body").text,
                     "the finished run shown as Completed")
        assert finished["state_type"] == "COMPLETED", finished["state"]
        assert finished["parameters"]["params"]["prune"]["ratio"] == 0.3
        client = MlflowClient(mlflow_url)
        (parent,) = client.search_runs([client.get_experiment_by_name("pruneflow").experiment_id],
                                       f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        assert parent.data.params["prune.ratio"] == "0.3" and parent.info.status == "FINISHED"
        assert parent.data.params["evaluate.max_ppl_ratio"] == "1000.0"
        name = parent.data.tags["pruneflow.registered_model"].split("/")[0]
        champion = client.get_model_version_by_alias(name, "champion")
        session.get(f"{mlflow_url}/#/models/{name}")
        browser.wait(session, lambda s: "champion" in s.find_element("tag name", "body").text,
                     "the champion alias on MLflow's registered-model page")
        assert f"Version {champion.version}" in session.find_element("tag name", "body").text, \
            browser.snap(session, "mlflow-model")
    finally:
        session.quit()
