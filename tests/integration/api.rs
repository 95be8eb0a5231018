//! The inference API as its users reach it: `curl` against the HTTP server, and
//! `mosquitto_pub`/`mosquitto_sub` against a real Mosquitto broker for MQTT v5 request/response.

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adaptd_adapters::{AdapterStore, Bundle};
use adaptd_daemon::api::mqtt;
use adaptd_daemon::api::{Api, http};
use adaptd_daemon::engine::{Engine, EngineConfig};
use adaptd_daemon::mqtt::{BrokerConnection, v5};
use adaptd_daemon::registry::Registry;
use tokio::sync::oneshot;

use crate::broker::Mosquitto;
use crate::{head_adapter, reference_bundle};

struct Served {
    _dir: tempfile::TempDir,
    api: Arc<Api>,
    engine: Option<Engine>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(e) = self.engine.take() {
            e.shutdown();
        }
    }
}

fn serve_digits(max_request_bytes: usize) -> Served {
    serve_bundle("digits-cnn", max_request_bytes)
}

/// `bundle` served with task "sorter" on a seeded head adapter (v1).
fn serve_bundle(bundle: &str, max_request_bytes: usize) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::open(reference_bundle(bundle)).unwrap();
    let (registry, _) = Registry::open(bundle, AdapterStore::open(dir.path()).unwrap(), 2).unwrap();
    let registry = Arc::new(registry);
    registry.ensure_task("digits").unwrap();
    registry.promote(head_adapter(registry.bundle(), "sorter", 1, 1)).unwrap();
    let engine = Engine::start(registry, EngineConfig::default()).unwrap();
    let api = Arc::new(Api::new(engine.handle.clone(), None, max_request_bytes));
    Served { _dir: dir, api, engine: Some(engine) }
}

fn curl(args: &[&str]) -> (u16, serde_json::Value) {
    let out = Command::new("curl").args(["-s", "-o", "-", "-w", "\n%{http_code}"]).args(args).output().expect("curl");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_string())))
}

fn digit_json() -> String {
    let data: Vec<String> = (0..64).map(|i| if (i % 8 == 3 || i % 8 == 4) && i > 8 { "0.9".into() } else { "0".into() }).collect();
    format!("{{\"inputs\": {{\"image\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}}}}}", data.join(", "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_predicts_and_refuses_bad_requests_with_reasons() {
    let served = serve_digits(64 * 1024);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, served.api.clone(), http::ServerLimits::default(), async {
        let _ = stopped.await;
    }));

    let body = digit_json();
    let base2 = base.clone();
    let results = tokio::task::spawn_blocking(move || {
        let url = |path: &str| format!("{base2}{path}");
        let ok = curl(&["-H", "content-type: application/json", "--data", &body, &url("/v1/tasks/sorter/predict")]);
        let json = ["-H", "content-type: application/json"];
        let base_model = curl(&[&json[..], &["--data", &body, &url("/v1/tasks/digits/predict")]].concat());
        let unknown = curl(&[&json[..], &["--data", &body, &url("/v1/tasks/nobody/predict")]].concat());
        let garbage = curl(&[&json[..], &["--data", "{\"inputs\": ", &url("/v1/tasks/sorter/predict")]].concat());
        let unknown_field = curl(&[&json[..], &["--data", "{\"inputz\": {}}", &url("/v1/tasks/sorter/predict")]].concat());
        let wrong_shape =
            curl(&[&json[..], &["--data", "{\"inputs\": {\"image\": {\"shape\": [1, 8, 8], \"data\": []}}}", &url("/v1/tasks/sorter/predict")]].concat());
        let big = "x".repeat(70 * 1024);
        let too_large = curl(&[&json[..], &["--data", &big, &url("/v1/tasks/sorter/predict")]].concat());
        let media = curl(&["-H", "content-type: image/gif", "--data", "GIF89a", &url("/v1/tasks/sorter/predict")]);
        let form = curl(&["--data", &body, &url("/v1/tasks/sorter/predict")]); // curl's default content type
        let ready = curl(&[&url("/readyz")]);
        vec![ok, base_model, unknown, garbage, unknown_field, wrong_shape, too_large, media, ready, form]
    })
    .await
    .unwrap();

    let (code, ok) = &results[0];
    assert_eq!(*code, 200, "{ok}");
    let p = &ok["predictions"][0];
    assert_eq!(p["adapter"], "sorter@v1");
    assert_eq!(p["scores"].as_object().unwrap().len(), 3);
    let (code, base_model) = &results[1];
    assert_eq!((*code, base_model["predictions"][0]["adapter"].as_str()), (200, Some("digits@v0")));
    let expect = [(404, "unknown_task"), (400, "bad_json"), (400, "bad_json"), (400, "bad_input"), (413, "too_large"), (415, "content_type")];
    for ((code, body), (want_code, want_type)) in results[2..8].iter().zip(expect) {
        assert_eq!((*code, body["error"]["type"].as_str()), (want_code, Some(want_type)), "{body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    assert!(results[4].1["error"]["message"].as_str().unwrap().contains("inputz"), "{}", results[4].1);
    assert!(results[5].1["error"]["message"].as_str().unwrap().contains("[1, 8, 8]"), "{}", results[5].1);
    assert_eq!(results[8].0, 200);
    let (code, form) = &results[9];
    assert_eq!(*code, 415);
    assert!(form["error"]["message"].as_str().unwrap().contains("-H 'content-type: application/json'"), "{form}");
    let refused = served.api.refused();
    assert_eq!(refused.get("bad_json"), Some(&2));
    assert_eq!(refused.get("too_large"), Some(&1));

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

fn mqtt_request(port: u16, topic: &str, reply: &str, payload: &[u8], content_type: Option<&str>) -> Output {
    // mosquitto_sub first; re-publish until it has seen the answer (the API may still be subscribing).
    let sub = Command::new("mosquitto_sub")
        .args(["-V", "mqttv5", "-h", "127.0.0.1", "-p", &port.to_string(), "-t", reply, "-C", "1", "-W", "20", "-F", "%D|%p"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), payload).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut sub = sub;
    while Instant::now() < deadline && sub.try_wait().unwrap().is_none() {
        let mut publish = Command::new("mosquitto_pub");
        publish.args(["-V", "mqttv5", "-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic, "-f", file.path().to_str().unwrap()]);
        publish.args(["-D", "publish", "response-topic", reply, "-D", "publish", "correlation-data", "req-42"]);
        if let Some(ct) = content_type {
            publish.args(["-D", "publish", "content-type", ct]);
        }
        assert!(publish.status().unwrap().success());
        std::thread::sleep(Duration::from_millis(200));
    }
    sub.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_v5_request_response_through_mosquitto() {
    let broker = Mosquitto::start();
    let served = serve_digits(64 * 1024);
    let topics = adaptd_protocol::Topics::new("adaptd/v1", "robot-7");
    let mut link = v5::Link::new(BrokerConnection::plain("127.0.0.1", broker.port), "adaptd-test".into(), mqtt::read_limit(served.api.max_request_bytes()));
    let inbox = mqtt::subscribe(&mut link, &topics);
    let (stop, stopped) = (tokio_util::sync::CancellationToken::new(), tokio_util::sync::CancellationToken::new());
    let handler = tokio::spawn(mqtt::run(served.api.clone(), link.client(), inbox, topics, stop.clone().cancelled_owned()));
    let link = tokio::spawn(link.run(stopped.clone().cancelled_owned()));

    let port = broker.port;
    let (ok, bad, binary, big_ok, too_big) = tokio::task::spawn_blocking(move || {
        let ok = mqtt_request(port, "adaptd/v1/robot-7/infer/sorter", "replies/ok", digit_json().as_bytes(), None);
        let bad = mqtt_request(port, "adaptd/v1/robot-7/infer/sorter", "replies/bad", b"{\"text\": [\"hello\"]}", None);
        // The compact form: safetensors bytes, as `safetensors.numpy.save` writes them.
        let header = br#"{"image":{"dtype":"F32","shape":[1,1,8,8],"data_offsets":[0,256]}}"#;
        let mut st = (header.len() as u64).to_le_bytes().to_vec();
        st.extend_from_slice(header);
        st.extend(std::iter::repeat_n(0.5f32.to_le_bytes(), 64).flatten());
        let binary = mqtt_request(port, "adaptd/v1/robot-7/infer/sorter", "replies/bin", &st, Some("application/x-safetensors"));
        // The limits are HTTP's (64 KiB here): 40 KiB is answered (rumqttc's default 10 KiB
        // dropped it without a word), 100 KiB is answered too_large.
        let big = format!("{}{}", digit_json(), " ".repeat(40 * 1024));
        let big_ok = mqtt_request(port, "adaptd/v1/robot-7/infer/sorter", "replies/big", big.as_bytes(), None);
        let too_big = format!("{}{}", digit_json(), " ".repeat(100 * 1024));
        let too_big = mqtt_request(port, "adaptd/v1/robot-7/infer/sorter", "replies/huge", too_big.as_bytes(), None);
        (ok, bad, binary, big_ok, too_big)
    })
    .await
    .unwrap();

    let text = |o: &Output| String::from_utf8_lossy(&o.stdout).trim().to_string();
    let (ok, bad, binary) = (text(&ok), text(&bad), text(&binary));
    let (corr, json) = ok.split_once('|').unwrap_or_else(|| panic!("no answer: {ok:?}"));
    assert_eq!(corr, "req-42", "correlation data must come back");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["predictions"][0]["adapter"], "sorter@v1");
    let v: serde_json::Value = serde_json::from_str(bad.split_once('|').unwrap().1).unwrap();
    assert_eq!(v["error"]["type"], "bad_input", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("does not take text"), "{v}");
    let v: serde_json::Value = serde_json::from_str(binary.split_once('|').unwrap().1).unwrap();
    assert_eq!(v["predictions"][0]["adapter_version"], 1, "{v}");
    let (big_ok, too_big) = (text(&big_ok), text(&too_big));
    let v: serde_json::Value = serde_json::from_str(big_ok.split_once('|').unwrap_or_else(|| panic!("no answer: {big_ok:?}")).1).unwrap();
    assert_eq!(v["predictions"][0]["adapter_version"], 1, "{v}");
    let v: serde_json::Value = serde_json::from_str(too_big.split_once('|').unwrap_or_else(|| panic!("no answer: {too_big:?}")).1).unwrap();
    assert_eq!(v["error"]["type"], "too_large", "{v}");

    stop.cancel();
    handler.await.unwrap();
    stopped.cancel();
    link.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_process_recovers_its_adapters_and_shuts_down_cleanly() {
    let state = tempfile::tempdir().unwrap();
    {
        // A previous run promoted sorter v1 and v2; v2 was damaged on disk since.
        let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
        let (registry, _) = Registry::open(bundle, AdapterStore::open(state.path().join("adapters")).unwrap(), 5).unwrap();
        registry.promote(head_adapter(registry.bundle(), "sorter", 1, 1)).unwrap();
        registry.promote(head_adapter(registry.bundle(), "sorter", 2, 2)).unwrap();
        std::fs::write(registry.store().version_dir("sorter", 2).join("head.safetensors"), b"garbage").unwrap();
    }
    let config = crate::serve_config(reference_bundle("digits-cnn"), state.path());
    let (stop, addr, daemon) = crate::serve_in_process(config).await;

    let answers = tokio::task::spawn_blocking(move || {
        let json = ["-H", "content-type: application/json"];
        let body = digit_json();
        let sorter = curl(&[&json[..], &["--data", &body, &format!("http://{addr}/v1/tasks/sorter/predict")]].concat());
        let base = curl(&[&json[..], &["--data", &body, &format!("http://{addr}/v1/tasks/digits-cnn/predict")]].concat());
        (sorter, base)
    })
    .await
    .unwrap();
    assert_eq!(answers.0.1["predictions"][0]["adapter"], "sorter@v1", "fell back past the damaged v2: {}", answers.0.1);
    assert_eq!(answers.1.1["predictions"][0]["adapter"], "digits-cnn@v0", "{}", answers.1.1);

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), daemon).await.expect("shuts down in time").unwrap().unwrap();
}

#[test]
fn png_and_jpeg_digits_answer_like_their_tensors_and_broken_images_are_refused() {
    use adaptd::datasets::{Digits, Shift};
    use adaptd_daemon::api::wire::{self, WireError};
    let served = serve_digits(1 << 20);
    let manifest = served.api.engine().manifest().clone();
    let digits = Digits::load(&crate::digits_data()).unwrap();
    let held: Vec<usize> = digits.held_out().into_iter().take(20).collect();
    let mut agree = 0;
    for &i in &held {
        let pixels: Vec<u8> = digits.image(i, Shift::None).iter().map(|v| (v * 255.0).round() as u8).collect();
        let img = image::GrayImage::from_raw(8, 8, pixels).unwrap();
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let from_png = wire::decode(&png, Some("image/png"), &manifest, None, 1 << 20).unwrap();
        assert_eq!(from_png[0].shape, vec![1, 1, 8, 8]);
        let a = served.api.engine().infer_blocking("digits", from_png).unwrap();
        let b = served.api.engine().infer_blocking("digits", vec![digits.batch(&[i], Shift::None)]).unwrap();
        agree += usize::from(a[0].class_index == b[0].class_index);
    }
    assert_eq!(agree, held.len(), "8-bit PNG quantisation must not change answers");

    // A 64x64 JPEG of a digit is converted and resized to the model's 8x8 grey input.
    let big = image::imageops::resize(&image::GrayImage::from_raw(8, 8, vec![128; 64]).unwrap(), 64, 64, image::imageops::FilterType::Nearest);
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageLuma8(big).to_rgb8().write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    let t = wire::decode(&jpeg, Some("image/jpeg"), &manifest, None, 1 << 20).unwrap();
    assert_eq!(t[0].shape, vec![1, 1, 8, 8]);
    assert!(t[0].as_f32().unwrap().iter().all(|v| (v - 128.0 / 255.0).abs() < 0.05));

    let err = wire::decode(b"\x89PNG\r\n\x1a\nnot really", Some("image/png"), &manifest, None, 1 << 20).unwrap_err();
    assert!(matches!(&err, WireError::Input(m) if m.contains("does not decode")), "{err}");
    let minilm = Bundle::open(reference_bundle("minilm")).unwrap();
    let err = wire::decode(&jpeg, Some("image/jpeg"), &minilm.manifest, None, 1 << 20).unwrap_err();
    assert!(err.to_string().contains("takes text input, not images"), "{err}");
}

/// A raw HTTP exchange on a connection of its own: the status code, or None when the server
/// closed the connection without answering.
fn raw_request(addr: std::net::SocketAddr, request: &[u8], wait: Duration) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(wait)).unwrap();
    stream.write_all(request).ok()?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    std::str::from_utf8(&answer).ok()?.split(' ').nth(1)?.parse().ok()
}

/// True once the server has closed `stream` (a read returns end of file).
fn closed_by_server(mut stream: &std::net::TcpStream) -> bool {
    use std::io::Read;
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    match stream.read(&mut [0u8; 64]) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

/// Slow, idle and lying clients, as any local user can make them: a flood of idle connections
/// and of half-sent headers does not stop `/healthz` or predict from answering, the server
/// closes them after its header timeout, a body announced past the limit is refused from its
/// `Content-Length` before it is read, a body that never arrives is answered 408 after the body
/// timeout, and past the connection limit a new connection is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slow_and_lying_clients_are_timed_out_and_serving_goes_on() {
    // The flood's descriptors: client and server ends in this one process.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let flood = (limit.rlim_cur as usize / 2).saturating_sub(200).min(2000);
    assert!(flood >= 400, "too few descriptors for the flood: {limit:?}", limit = limit.rlim_cur);
    let served = serve_digits(64 * 1024);
    let header_timeout = Duration::from_secs(5);
    let limits = http::ServerLimits { header_timeout, body_timeout: Duration::from_secs(1), max_connections: flood + 64 };
    let listener = http::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, served.api.clone(), limits, async {
        let _ = stopped.await;
    }));
    let api = served.api.clone();
    let body = digit_json();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        // Half idle, half a request's first line and no more.
        let held: Vec<std::net::TcpStream> = (0..flood)
            .map(|i| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                if i % 2 == 1 {
                    s.write_all(b"POST /v1/tasks/sorter/predict HTTP/1.1\r\nHost: x\r\n").unwrap();
                }
                s
            })
            .collect();
        let started = Instant::now();
        while api.connections().open.load(std::sync::atomic::Ordering::Relaxed) < flood as u64 {
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "the server did not take the flood: {} of {flood} open",
                api.connections().open.load(std::sync::atomic::Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let all_open = Instant::now();
        let predict = format!(
            "POST /v1/tasks/sorter/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        for _ in 0..10 {
            assert_eq!(raw_request(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", Duration::from_secs(5)), Some(200));
            assert_eq!(raw_request(addr, predict.as_bytes(), Duration::from_secs(5)), Some(200));
        }

        // A 2 GB body announced, 100 bytes sent: refused at once, from the header.
        let started = Instant::now();
        let lying = format!("POST /v1/tasks/sorter/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000000\r\n\r\n{}", "x".repeat(100));
        assert_eq!(raw_request(addr, lying.as_bytes(), Duration::from_secs(5)), Some(413));
        assert!(started.elapsed() < Duration::from_secs(1), "refused before the body timeout: {:?}", started.elapsed());
        // 1,000 bytes announced, 10 sent: 408 once the body timeout passes.
        let slow = "POST /v1/tasks/sorter/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789";
        assert_eq!(raw_request(addr, slow.as_bytes(), Duration::from_secs(5)), Some(408));
        assert_eq!(api.connections().body_timeouts.load(std::sync::atomic::Ordering::Relaxed), 1);

        // Past the header timeout every flooding connection is closed by the server.
        std::thread::sleep((header_timeout + Duration::from_millis(1500)).saturating_sub(all_open.elapsed()));
        let still_open = held.iter().filter(|s| !closed_by_server(s)).count();
        assert_eq!(still_open, 0, "of {flood} idle and half-sent connections");
        let started = Instant::now();
        while api.connections().open.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            assert!(started.elapsed() < Duration::from_secs(5), "connections not released");
            std::thread::sleep(Duration::from_millis(10));
        }

        // Past the connection limit a new connection is closed at once, and counted.
        let mut at_limit: Vec<std::net::TcpStream> = (0..flood + 64).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        while api.connections().open.load(std::sync::atomic::Ordering::Relaxed) < (flood + 64) as u64 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let one_more = std::net::TcpStream::connect(addr).unwrap();
        assert!(closed_by_server(&one_more), "a connection past the limit is closed at once");
        assert!(api.connections().refused.load(std::sync::atomic::Ordering::Relaxed) >= 1);
        drop(at_limit.drain(..));
    })
    .await
    .unwrap();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("the server stops").unwrap().unwrap();
}

/// A camera frame answers the same whether it comes as the camera's JPEG, as a PNG, as a raw RGB
/// frame or inside a batch of raw frames, over HTTP and over MQTT; a frame at 1280x720 is
/// resized and cropped like any other; an RGBA frame is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_frame_answers_alike_as_jpeg_png_and_raw_rgb_over_http_and_mqtt() {
    use adaptd::datasets::CameraFrames;
    let camera = CameraFrames::load(&adaptd::paths::camera_data()).expect("the set-up made the camera task's frames");
    let jpeg = camera.frames[camera.of_domain("base")[3]].clone();
    let rgb = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    let (w, h) = rgb.dimensions();
    let mut png = Vec::new();
    rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let raw = |frames: &[&[u8]], shape: &[usize]| {
        let header = format!(r#"{{"image":{{"dtype":"U8","shape":{shape:?},"data_offsets":[0,{}]}}}}"#, frames.iter().map(|f| f.len()).sum::<usize>());
        let mut st = (header.len() as u64).to_le_bytes().to_vec();
        st.extend_from_slice(header.as_bytes());
        frames.iter().for_each(|f| st.extend_from_slice(f));
        st
    };
    let pixels = rgb.as_raw().as_slice();
    let (h, w) = (h as usize, w as usize);
    let one_raw = raw(&[pixels], &[h, w, 3]);
    let batch_raw = raw(&[pixels, pixels], &[2, h, w, 3]);
    let rgba_raw = raw(&[&[0u8; 16]], &[2, 2, 4]);
    // The same scene from a 1280x720 camera (as JPEG: a raw 720p frame is over the 1 MiB limit).
    let hd = image::imageops::resize(&rgb, 1280, 720, image::imageops::FilterType::Triangle);
    let mut hd_jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(hd).write_to(&mut std::io::Cursor::new(&mut hd_jpeg), image::ImageFormat::Jpeg).unwrap();

    let served = serve_bundle("efficientnet-lite0", 1 << 20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1/tasks/sorter/predict", listener.local_addr().unwrap());
    let (stop_http, stopped_http) = oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, served.api.clone(), http::ServerLimits::default(), async {
        let _ = stopped_http.await;
    }));
    let broker = Mosquitto::start();
    let topics = adaptd_protocol::Topics::new("adaptd/v1", "cam-1");
    let mut link = v5::Link::new(BrokerConnection::plain("127.0.0.1", broker.port), "adaptd-cam".into(), mqtt::read_limit(served.api.max_request_bytes()));
    let inbox = mqtt::subscribe(&mut link, &topics);
    let (stop, stopped) = (tokio_util::sync::CancellationToken::new(), tokio_util::sync::CancellationToken::new());
    let handler = tokio::spawn(mqtt::run(served.api.clone(), link.client(), inbox, topics, stop.clone().cancelled_owned()));
    let link = tokio::spawn(link.run(stopped.clone().cancelled_owned()));

    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        format!("@{}", path.display())
    };
    let bodies = [
        ("image/jpeg", file("frame.jpg", &jpeg)),
        ("image/png", file("frame.png", &png)),
        ("application/x-safetensors", file("frame.st", &one_raw)),
        ("application/x-safetensors", file("frames.st", &batch_raw)),
        ("image/jpeg", file("hd.jpg", &hd_jpeg)),
        ("application/x-safetensors", file("rgba.st", &rgba_raw)),
    ];
    let port = broker.port;
    let (http_answers, mqtt_answer) = tokio::task::spawn_blocking(move || {
        let answers: Vec<(u16, serde_json::Value)> =
            bodies.iter().map(|(ct, body)| curl(&["-H", &format!("content-type: {ct}"), "--data-binary", body, &base])).collect();
        let over_mqtt = mqtt_request(port, "adaptd/v1/cam-1/infer/sorter", "replies/cam", &one_raw, Some("application/x-safetensors"));
        (answers, String::from_utf8_lossy(&over_mqtt.stdout).trim().to_string())
    })
    .await
    .unwrap();

    let scores = |v: &serde_json::Value, i: usize| -> Vec<f64> {
        let p = &v["predictions"][i]["scores"];
        crate::TEST_LABELS.iter().map(|l| p[*l].as_f64().unwrap_or_else(|| panic!("no score for {l}: {v}"))).collect()
    };
    for (i, (code, body)) in http_answers[..5].iter().enumerate() {
        assert_eq!(*code, 200, "request {i}: {body}");
    }
    let jpeg_scores = scores(&http_answers[0].1, 0);
    // PNG, raw and batched raw frames hold exactly the JPEG's decoded pixels: the same answer.
    for (i, row) in [(1, 0), (2, 0), (3, 0), (3, 1)] {
        let other = scores(&http_answers[i].1, row);
        let diff = jpeg_scores.iter().zip(&other).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(diff < 1e-4, "request {i} row {row} differs from the JPEG's answer by {diff}");
    }
    assert_eq!(http_answers[3].1["predictions"].as_array().unwrap().len(), 2);
    // The 720p frame, cropped to its centre and resized, sees the same scene: the same label.
    assert_eq!(http_answers[4].1["predictions"][0]["label"], http_answers[0].1["predictions"][0]["label"], "{}", http_answers[4].1);
    let (code, rgba) = &http_answers[5];
    assert_eq!((*code, rgba["error"]["type"].as_str()), (400, Some("bad_input")), "{rgba}");
    assert!(rgba["error"]["message"].as_str().unwrap().contains("3 channels (RGB) or 1 (grey), got 4"), "{rgba}");
    let (corr, json) = mqtt_answer.split_once('|').unwrap_or_else(|| panic!("no MQTT answer: {mqtt_answer:?}"));
    assert_eq!(corr, "req-42");
    let over_mqtt: serde_json::Value = serde_json::from_str(json).unwrap();
    let diff = jpeg_scores.iter().zip(scores(&over_mqtt, 0)).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff < 1e-4, "the raw frame over MQTT differs from the JPEG over HTTP by {diff}");

    stop.cancel();
    handler.await.unwrap();
    stopped.cancel();
    link.await.unwrap();
    let _ = stop_http.send(());
    server.await.unwrap().unwrap();
}
