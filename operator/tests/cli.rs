//! The `keelmq-operator` binary's offline subcommands, run as a user (or the
//! chart checks) runs them. Building this test also builds the binary in the
//! test command's one build, which the chart checks then use.

use std::path::Path;
use std::process::{Command, Output};

fn operator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keelmq-operator"))
        .args(args)
        .output()
        .expect("run keelmq-operator")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

fn repo_file(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn rbac_prints_what_the_chart_grants() {
    let printed: serde_json::Value =
        serde_json::from_str(&stdout(&operator(&["rbac"]))).expect("rbac prints JSON");
    let committed: serde_json::Value =
        serde_json::from_str(&repo_file("charts/keelmq/files/operator-rbac.json"))
            .expect("committed JSON");
    assert_eq!(
        printed, committed,
        "charts/keelmq/files/operator-rbac.json is out of date: run scripts/chart-check --sync"
    );
}

#[test]
fn crds_prints_both_definitions() {
    let printed = stdout(&operator(&["crds"]));
    for kind in [
        "kind: CustomResourceDefinition",
        "name: brokergroups.keelmq.io",
        "name: topics.keelmq.io",
    ] {
        assert!(printed.contains(kind), "missing {kind:?}");
    }
}

#[test]
fn render_refuses_a_missing_file_with_its_path() {
    let out = operator(&["render", "--file", "/nonexistent/group.yaml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/group.yaml"), "{err}");
}

#[test]
fn render_prints_the_objects_of_a_sample_group() {
    let sample =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/samples/brokergroup-minimal.yaml");
    let printed = stdout(&operator(&["render", "--file", &sample.to_string_lossy()]));
    for kind in [
        "kind: StatefulSet",
        "kind: ConfigMap",
        "kind: Service",
        "kind: PodDisruptionBudget",
    ] {
        assert!(printed.contains(kind), "missing {kind:?}:\n{printed}");
    }
}
