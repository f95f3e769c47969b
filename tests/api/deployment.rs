//! The deployment files say what the service does: fixed ids, a stop timeout above the grace
//! period everywhere one is given, and a compose snippet that tolerates a missing `.env`.
//! (No container engine runs on the development machines; these read the files themselves.)

const DOCKERFILE: &str = include_str!("../../Dockerfile");
const DEPLOYMENT: &str = include_str!("../../Docs/DEPLOYMENT.md");
const README: &str = include_str!("../../README.md");

/// `SHUTDOWN_GRACE_SECS`'s default, from the one list of settings.
fn grace_secs() -> f64 {
    al_chat::config::VARS
        .iter()
        .find(|v| v.name == "SHUTDOWN_GRACE_SECS")
        .unwrap()
        .default
        .parse()
        .unwrap()
}

/// Every number that follows `marker` in `text`.
fn numbers_after(text: &str, marker: &str) -> Vec<f64> {
    text.match_indices(marker)
        .map(|(i, _)| {
            let rest = &text[i + marker.len()..];
            let digits: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            digits
                .parse()
                .unwrap_or_else(|_| panic!("no number after {marker:?}"))
        })
        .collect()
}

#[test]
fn every_stop_timeout_the_docs_give_exceeds_the_grace_period() {
    let grace = grace_secs();
    let mut found = 0;
    for (file, text) in [
        ("Dockerfile", DOCKERFILE),
        ("DEPLOYMENT.md", DEPLOYMENT),
        ("README.md", README),
    ] {
        for marker in ["--stop-timeout", "stop_grace_period:"] {
            for secs in numbers_after(text, marker) {
                assert!(
                    secs > grace,
                    "{file}: {marker} {secs} is not above the {grace} s grace"
                );
                found += 1;
            }
        }
    }
    assert!(
        found >= 3,
        "the Dockerfile, the run line and the compose snippet each give one"
    );
}

#[test]
fn the_image_user_has_a_fixed_uid_and_gid_and_apt_never_asks() {
    assert!(DOCKERFILE.contains("groupadd --gid 10001"));
    assert!(DOCKERFILE.contains("--uid 10001 --gid 10001"));
    assert!(DOCKERFILE.contains("USER 10001:10001"));
    assert!(DOCKERFILE.contains("DEBIAN_FRONTEND=noninteractive"));
    assert!(
        !DOCKERFILE.contains("useradd --system"),
        "a system user gets a system gid"
    );
}

#[test]
fn the_compose_snippet_tolerates_a_missing_env_file_and_explains_the_volume_owner() {
    assert!(DEPLOYMENT.contains("required: false"));
    assert!(DEPLOYMENT.contains("chown 10001:10001"));
    assert!(
        DEPLOYMENT.contains("--format docker"),
        "Podman keeps the HEALTHCHECK only so"
    );
    assert!(!DEPLOYMENT.contains("has not been built"));
}
