//! A real Mosquitto broker for tests, on a free loopback port, stopped when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mosquitto {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    conf: PathBuf,
}

fn mosquitto_binary() -> PathBuf {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].iter().map(PathBuf::from).find(|p| p.is_file()).expect("mosquitto is not installed: run `make setup`")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with("")
    }

    /// Start with extra lines of mosquitto.conf; `{dir}` in them names a directory that lives
    /// as long as the broker (for a persistence file).
    pub fn start_with(extra_config: &str) -> Mosquitto {
        for _ in 0..5 {
            if let Some(broker) = Mosquitto::try_start(free_port(), extra_config) {
                return broker;
            }
        }
        panic!("mosquitto did not start");
    }

    /// On `port` (a client may have been told it before the broker is there).
    pub fn start_on(port: u16, extra_config: &str) -> Mosquitto {
        Mosquitto::try_start(port, extra_config).unwrap_or_else(|| panic!("mosquitto did not start on port {port}"))
    }

    fn try_start(port: u16, extra_config: &str) -> Option<Mosquitto> {
        let dir = tempfile::tempdir().unwrap();
        let extra_config = extra_config.replace("{dir}", &dir.path().display().to_string());
        // Started as root, Mosquitto switches to its own user, which cannot write a persistence
        // file into our private directory: it would then start every time with no sessions.
        let stay = if std::os::unix::fs::MetadataExt::uid(&dir.path().metadata().unwrap()) == 0 { "user root\n" } else { "" };
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{stay}{extra_config}")).unwrap();
        let mut child = Command::new(mosquitto_binary()).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start mosquitto");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Mosquitto { port, child, dir, conf });
            }
            if child.try_wait().unwrap().is_some() {
                return None; // lost the port to someone else
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The broker's own directory (configuration, persistence file).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Stop the broker the way an init system does (SIGTERM: it saves its persistence file) and
    /// start it again on the same port and configuration.
    pub fn restart(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.child =
                Command::new(mosquitto_binary()).arg("-c").arg(&self.conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("restart mosquitto");
            let up = Instant::now() + Duration::from_secs(2);
            while Instant::now() < up {
                if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return;
                }
                if self.child.try_wait().unwrap().is_some() {
                    break; // the port is still in TIME_WAIT or taken: try again
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(Instant::now() < deadline, "mosquitto did not come back on port {}", self.port);
            let _ = self.child.kill();
            let _ = self.child.wait();
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
