//! Which Linux capabilities the kernel side needs, and which of them this process lacks.
//!
//! Loading tracing programs and reading kernel memory from them needs CAP_BPF and CAP_PERFMON
//! (Linux 5.8+); CAP_SYS_ADMIN covers both on older kernels. The effective set is read from
//! `/proc/self/status` so the error can name exactly what is missing before anything loads.

/// Capability bit numbers (`linux/capability.h`).
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// What the kernel side needs: (bit, name).
pub const REQUIRED: &[(u32, &str)] = &[(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")];

/// The effective capability mask from the text of `/proc/<pid>/status`.
pub fn effective_from_status(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

/// The names of the required capabilities missing from `eff` (empty: all there).
pub fn missing(eff: u64) -> Vec<&'static str> {
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    if has(CAP_SYS_ADMIN) && !REQUIRED.iter().all(|(b, _)| has(*b)) {
        // Kernels before 5.8 know neither CAP_BPF nor CAP_PERFMON: CAP_SYS_ADMIN stands in, and
        // a newer kernel grants both to CAP_SYS_ADMIN holders anyway.
        return Vec::new();
    }
    REQUIRED
        .iter()
        .filter(|(b, _)| !has(*b))
        .map(|(_, n)| *n)
        .collect()
}

/// The missing capabilities of this process, or why they could not be read.
pub fn missing_here() -> Result<Vec<&'static str>, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    let eff = effective_from_status(&status)
        .ok_or_else(|| "no CapEff line in /proc/self/status".to_string())?;
    Ok(missing(eff))
}

/// The start-up error text for a non-empty `missing` list.
pub fn message(missing: &[&str]) -> String {
    format!(
        "missing capability {} (the ebpf receiver loads BPF programs: run tailweave as root, or \
         grant them with `setcap cap_bpf,cap_perfmon+ep <tailweave binary>`)",
        missing.join(" and ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cap_eff_and_names_what_is_missing() {
        let root = "Name:\ttailweave\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_from_status(root), Some(0x1ff_ffff_ffff));
        assert!(missing(0x1ff_ffff_ffff).is_empty());
        let nobody = "CapEff:\t0000000000000000\n";
        assert_eq!(
            missing(effective_from_status(nobody).unwrap()),
            ["CAP_BPF", "CAP_PERFMON"]
        );
        assert_eq!(missing(1 << CAP_BPF), ["CAP_PERFMON"]);
        assert!(missing((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_empty());
        assert!(missing(1 << CAP_SYS_ADMIN).is_empty());
        assert_eq!(effective_from_status("Name: x\n"), None);
        assert!(message(&["CAP_BPF"]).contains("missing capability CAP_BPF"));
    }
}
