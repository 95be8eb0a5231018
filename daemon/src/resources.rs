//! Whether the device can afford a training job now: CPU load and free memory (`sysinfo`),
//! temperatures from the thermal zones and, on Jetson, GPU load, read from sysfs. The sysfs root
//! is configurable, so tests can lay out a fake Jetson in a directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the device must have to spare before a job starts: part of the `[schedule]` section of
/// the configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResourceLimits {
    /// Whole-machine CPU use above which no job starts, in percent (100: off).
    pub max_cpu_percent: f32,
    /// Memory that must stay available, in MiB.
    pub min_available_mb: u64,
    /// Hottest thermal zone above which no job starts, in °C.
    pub max_temperature_c: f32,
    /// Jetson GPU load above which no job starts, in percent (100: off).
    pub max_gpu_percent: f32,
    pub sysfs_root: PathBuf,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits { max_cpu_percent: 95.0, min_available_mb: 512, max_temperature_c: 85.0, max_gpu_percent: 90.0, sysfs_root: PathBuf::from("/sys") }
    }
}

/// One reading of the device.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Reading {
    pub cpu_percent: f32,
    pub available_mb: u64,
    pub total_mb: u64,
    /// (zone type, °C) of every readable thermal zone.
    pub temperatures_c: Vec<(String, f32)>,
    /// Jetson only.
    pub gpu_percent: Option<f32>,
}

impl Reading {
    /// Why training must wait, or None when it may run.
    pub fn busy_reason(&self, limits: &ResourceLimits) -> Option<String> {
        if self.cpu_percent > limits.max_cpu_percent {
            return Some(format!("CPU at {:.0} % (limit {:.0} %)", self.cpu_percent, limits.max_cpu_percent));
        }
        if self.available_mb < limits.min_available_mb {
            return Some(format!("{} MiB available (at least {} MiB must stay free)", self.available_mb, limits.min_available_mb));
        }
        if let Some((zone, t)) = self.temperatures_c.iter().max_by(|a, b| a.1.total_cmp(&b.1))
            && *t > limits.max_temperature_c
        {
            return Some(format!("{zone} at {t:.1} °C (limit {:.1} °C)", limits.max_temperature_c));
        }
        if let Some(g) = self.gpu_percent
            && g > limits.max_gpu_percent
        {
            return Some(format!("GPU at {g:.0} % (limit {:.0} %)", limits.max_gpu_percent));
        }
        None
    }
}

/// Takes readings; keeps `sysinfo`'s state between them (CPU use is a difference of two samples).
pub struct Monitor {
    /// None where `sysinfo` does not support the platform: CPU and memory then read as unknown.
    system: Option<sysinfo::System>,
    sysfs_root: PathBuf,
}

impl Monitor {
    pub fn new(sysfs_root: &Path) -> Monitor {
        let system = match sysinfo::System::new() {
            Ok(mut system) => {
                system.refresh_cpu_usage();
                system.refresh_memory();
                Some(system)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read CPU and memory use; training is gated on temperature and GPU load only");
                None
            }
        };
        Monitor { system, sysfs_root: sysfs_root.to_path_buf() }
    }

    pub fn read(&mut self) -> Reading {
        let (cpu_percent, available_mb, total_mb) = match &mut self.system {
            Some(system) => {
                system.refresh_cpu_usage();
                system.refresh_memory();
                (system.global_cpu_usage(), system.available_memory() / (1024 * 1024), system.total_memory() / (1024 * 1024))
            }
            None => (0.0, u64::MAX, 0),
        };
        Reading { cpu_percent, available_mb, total_mb, temperatures_c: thermal_zones(&self.sysfs_root), gpu_percent: jetson_gpu_load(&self.sysfs_root) }
    }
}

/// `class/thermal/thermal_zone*/{type,temp}` (millidegrees). Unreadable zones are skipped.
pub fn thermal_zones(sysfs_root: &Path) -> Vec<(String, f32)> {
    let dir = sysfs_root.join("class/thermal");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut zones: Vec<(String, f32)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|e| {
            let temp = std::fs::read_to_string(e.path().join("temp")).ok()?.trim().parse::<f32>().ok()?;
            let kind =
                std::fs::read_to_string(e.path().join("type")).map(|s| s.trim().to_string()).unwrap_or_else(|_| e.file_name().to_string_lossy().into_owned());
            Some((kind, temp / 1000.0))
        })
        .collect();
    zones.sort_by(|a, b| a.0.cmp(&b.0));
    zones
}

/// Jetson GPU load in percent: `devices/platform/gpu.0/load` (or `devices/gpu.0/load` on older
/// L4T), which holds per-mille.
pub fn jetson_gpu_load(sysfs_root: &Path) -> Option<f32> {
    ["devices/platform/gpu.0/load", "devices/gpu.0/load", "devices/platform/17000000.gpu/load"]
        .iter()
        .find_map(|p| std::fs::read_to_string(sysfs_root.join(p)).ok()?.trim().parse::<f32>().ok())
        .map(|per_mille| per_mille / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_fake_jetson_and_names_what_is_too_hot() {
        let root = tempfile::tempdir().unwrap();
        for (i, (kind, milli)) in [("CPU-therm", "45500"), ("GPU-therm", "91000")].iter().enumerate() {
            let zone = root.path().join(format!("class/thermal/thermal_zone{i}"));
            std::fs::create_dir_all(&zone).unwrap();
            std::fs::write(zone.join("type"), kind).unwrap();
            std::fs::write(zone.join("temp"), milli).unwrap();
        }
        std::fs::create_dir_all(root.path().join("devices/platform/gpu.0")).unwrap();
        std::fs::write(root.path().join("devices/platform/gpu.0/load"), "955\n").unwrap();

        let zones = thermal_zones(root.path());
        assert_eq!(zones, vec![("CPU-therm".to_string(), 45.5), ("GPU-therm".to_string(), 91.0)]);
        assert_eq!(jetson_gpu_load(root.path()), Some(95.5));

        let limits = ResourceLimits { sysfs_root: root.path().to_path_buf(), ..ResourceLimits::default() };
        let mut reading = Monitor::new(root.path()).read();
        reading.cpu_percent = 10.0;
        reading.available_mb = 4096;
        assert!(reading.busy_reason(&limits).unwrap().contains("GPU-therm at 91.0"));
        reading.temperatures_c.pop();
        assert!(reading.busy_reason(&limits).unwrap().contains("GPU at 96 %"));
        reading.gpu_percent = Some(20.0);
        assert_eq!(reading.busy_reason(&limits), None);
        reading.available_mb = 100;
        assert!(reading.busy_reason(&limits).unwrap().contains("100 MiB available"));
    }
}
