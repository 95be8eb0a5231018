//! The .deb: what it installs, where, and that the installed files work together.

use std::process::Command;

#[test]
fn the_deb_installs_the_binary_unit_config_and_docs() {
    let out = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/deb/build.sh");
    let built = Command::new(script).args([env!("CARGO_BIN_EXE_adaptd"), out.path().to_str().unwrap()]).env("DEB_COMPRESSION", "none").output().unwrap();
    assert!(built.status.success(), "build.sh: {}", String::from_utf8_lossy(&built.stderr));
    let deb = String::from_utf8(built.stdout).unwrap().trim().to_string();

    let info = Command::new("dpkg-deb").args(["--info", &deb]).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    for field in ["Package: adaptd", "Architecture: amd64", "Depends: libc6, libstdc++6, adduser, systemd", "conffiles", "postinst"] {
        assert!(info.contains(field), "{field} in\n{info}");
    }
    let contents = Command::new("dpkg-deb").args(["--contents", &deb]).output().unwrap();
    let contents = String::from_utf8_lossy(&contents.stdout);
    for path in [
        "./usr/bin/adaptd",
        "./lib/systemd/system/adaptd.service",
        "./etc/adaptd/adaptd.toml",
        "./usr/share/doc/adaptd/jetson.md",
        "./usr/share/doc/adaptd/examples/jetson-orin-nano.toml",
        "./usr/share/doc/adaptd/examples/mosquitto-adaptd.conf",
    ] {
        assert!(contents.lines().any(|l| l.ends_with(path)), "{path} in\n{contents}");
    }

    // Unpacked into a throwaway root, the installed binary accepts the installed configuration.
    let root = tempfile::tempdir().unwrap();
    assert!(Command::new("dpkg-deb").args(["-x", &deb, root.path().to_str().unwrap()]).status().unwrap().success());
    let validate =
        Command::new(root.path().join("usr/bin/adaptd")).args(["validate", "--config"]).arg(root.path().join("etc/adaptd/adaptd.toml")).output().unwrap();
    assert!(validate.status.success(), "{}", String::from_utf8_lossy(&validate.stderr));
    let conffiles = Command::new("dpkg-deb").args(["-I", &deb, "conffiles"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&conffiles.stdout).trim(), "/etc/adaptd/adaptd.toml", "local edits survive upgrades");
}
