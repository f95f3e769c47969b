//! The deployment files say what the service does: fixed ids, a stop timeout above the grace
//! period everywhere one is given, and a compose snippet that tolerates a missing `.env`.
//! (No container engine runs on the development machines; these read the files themselves.)

const DOCKERFILE: &str = include_str!("../../Dockerfile");
const DEPLOYMENT: &str = include_str!("../../Docs/DEPLOYMENT.md");
const README: &str = include_str!("../../README.md");
const COMPOSE: &str = include_str!("../../deploy/compose.yaml");

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
        ("deploy/compose.yaml", COMPOSE),
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

/// The deployment files live in `deploy/`; the pages that show them quote them whole, so a change
/// to a file that the docs do not follow (or the reverse) fails here. Every `yaml` and `nginx`
/// block in `Docs/` is one of these files: there is no second, drifting copy.
#[test]
fn the_docs_show_the_deploy_files_exactly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let files = [
        "deploy/compose.yaml",
        "deploy/nginx.conf",
        "deploy/al-chat.env.example",
    ];
    let shown = [
        ("Docs/SCALING.md", "deploy/compose.yaml"),
        ("Docs/SCALING.md", "deploy/nginx.conf"),
        ("Docs/DEPLOYMENT.md", "deploy/compose.yaml"),
        ("Docs/DEPLOYMENT.md", "deploy/al-chat.env.example"),
        ("Docs/SECURITY.md", "deploy/nginx.conf"),
    ];
    // Each fenced block of a page, as (language, text).
    let blocks = |doc: &str| -> Vec<(String, String)> {
        let text = read(doc);
        let mut out = Vec::new();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("```") {
            let after = &rest[start + 3..];
            let Some(eol) = after.find('\n') else { break };
            let lang = after[..eol].trim().to_string();
            let body = &after[eol + 1..];
            let Some(end) = body.find("```") else { break };
            out.push((lang, body[..end].to_string()));
            rest = &body[end + 3..];
        }
        out
    };
    for (doc, file) in shown {
        let expected = read(file);
        let first = expected.lines().next().unwrap();
        let found: Vec<String> = blocks(doc)
            .into_iter()
            .map(|(_, b)| b)
            .filter(|b| b.lines().next() == Some(first))
            .collect();
        assert_eq!(found.len(), 1, "{doc} shows {file} once");
        assert_eq!(
            found[0], expected,
            "{doc}'s copy of {file} differs from the file"
        );
    }
    for doc in [
        "Docs/SCALING.md",
        "Docs/DEPLOYMENT.md",
        "Docs/SECURITY.md",
        "README.md",
    ] {
        for (lang, block) in blocks(doc) {
            if lang == "yaml" || lang == "nginx" {
                assert!(
                    files.iter().any(|f| read(f) == block),
                    "{doc} has a {lang} block that is not a file of deploy/:\n{block}"
                );
            }
        }
    }
}
