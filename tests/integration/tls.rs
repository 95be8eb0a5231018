//! A broker that wants TLS, a client certificate and a password: the daemon's ingest connects
//! with what its configuration names, and samples land; with a wrong password nothing does.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use adaptd_daemon::config::Config;

use crate::broker::Mosquitto;
use crate::reference_bundle;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed by the set-up");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate: PEM, X.509 v3 with the
/// extensions rustls insists on (a v1 certificate is refused as unsupported).
pub(crate) fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=adaptd test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    std::fs::write(dir.join("server.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n").unwrap();
    std::fs::write(dir.join("client.cnf"), "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n").unwrap();
    for (name, cn) in [("server", "127.0.0.1"), ("client", "robot-3")] {
        let (key, csr, pem, ext) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.cnf"));
        openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}")]);
        openssl(dir, &["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", &pem, "-days", "2", "-extfile", &ext]);
    }
}

#[allow(clippy::field_reassign_with_default)] // reads as "the defaults, except"
fn daemon_config(dir: &Path, port: u16, password_file: &Path) -> Config {
    let mut c = adaptd_daemon::config::Config::default();
    c.bundle = reference_bundle("digits-cnn");
    c.state_dir = dir.join("state");
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.host = "127.0.0.1".into();
    c.mqtt.port = port;
    c.mqtt.device_id = "robot-3".into();
    c.mqtt.inference_api = false;
    c.mqtt.username = "robot-3".into();
    c.mqtt.password_file = password_file.to_path_buf();
    c.mqtt.tls_ca_file = dir.join("ca.pem");
    c.mqtt.tls_client_cert_file = dir.join("client.pem");
    c.mqtt.tls_client_key_file = dir.join("client.key");
    c.ingest.tasks = vec!["sorter".into()];
    c.schedule.trigger.min_new_samples = 0;
    c.schedule.trigger.interval = std::time::Duration::from_secs(0);
    c
}

fn publish_one(dir: &Path, port: u16, key: &str) {
    let sample = format!(
        "{{\"key\": \"{key}\", \"task\": \"sorter\", \"label\": \"3\", \"input\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}}}",
        vec!["0.5"; 64].join(",")
    );
    let out = Command::new("mosquitto_pub")
        .current_dir(dir)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--cafile",
            "ca.pem",
            "--cert",
            "client.pem",
            "--key",
            "client.key",
            "-u",
            "robot-3",
            "-P",
            "s3cret",
            "-q",
            "1",
            "-t",
            "adaptd/v1/robot-3/samples/sorter",
            "-m",
            &sample,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "mosquitto_pub over TLS: {}", String::from_utf8_lossy(&out.stderr));
}

async fn stored_after(config: Config, dir: &Path, port: u16, key: &str, wait: Duration) -> u64 {
    let (stop, addr, daemon) = crate::serve_in_process(config).await;
    let client = adaptd::client::Client::new(addr);
    let dir = dir.to_path_buf();
    let key = key.to_string();
    let stored = tokio::task::spawn_blocking(move || {
        // Ingest subscribes (or, refused by the broker, never does): then the sample goes out.
        let subscribed = Instant::now() + Duration::from_secs(10).min(wait);
        while client.metric("adaptd_ingest_connected").ok().flatten() != Some(1.0) && Instant::now() < subscribed {
            std::thread::sleep(Duration::from_millis(100));
        }
        publish_one(&dir, port, &key);
        let deadline = Instant::now() + wait;
        loop {
            let n = client.get("/v1/tasks/sorter/status").ok().and_then(|r| r.body["samples"].as_u64()).unwrap_or(0);
            if n > 0 || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), daemon).await.expect("stops").unwrap().unwrap();
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_connects_with_tls_a_client_certificate_and_a_password() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let passwd = dir.path().join("passwd");
    assert!(Command::new("mosquitto_passwd").args(["-c", "-b"]).arg(&passwd).args(["robot-3", "s3cret"]).status().unwrap().success());
    // Mosquitto started as root drops to its own user: let it read this throwaway PKI.
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::set_permissions(entry.unwrap().path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = dir.path().display();
    let broker = Mosquitto::start_with(&format!(
        "cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\npassword_file {d}/passwd\nallow_anonymous false\n"
    ));
    let good = dir.path().join("password");
    std::fs::write(&good, "s3cret\n").unwrap();
    let n = stored_after(daemon_config(dir.path(), broker.port, &good), dir.path(), broker.port, "tls:1", Duration::from_secs(15)).await;
    assert_eq!(n, 1, "the sample arrived over TLS with a client certificate and a password");

    // The wrong password: the broker refuses the daemon, and nothing lands in a fresh store.
    let bad = dir.path().join("wrong");
    std::fs::write(&bad, "guess\n").unwrap();
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let n = stored_after(daemon_config(dir.path(), broker.port, &bad), dir.path(), broker.port, "tls:2", Duration::from_secs(2)).await;
    assert_eq!(n, 0, "a refused login stores nothing");
}
