//! `--costs`: the emulated cost runs' figures, read from the console and tabled.

use anyhow::Result;
use serde_json::Value;

use crate::workspace_root;

/// One measurement of the guest's cost section: `collateral|storm CONFIG {json}`.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Cost {
    pub(super) kernel: String,
    pub(super) load: String,
    pub(super) config: String,
    pub(super) per_second: f64,
}

pub(super) fn parse_costs(kernel: &str, console: &str) -> Vec<Cost> {
    let Some((_, section)) = console.split_once("@@COSTS") else { return Vec::new() };
    section
        .lines()
        .take_while(|l| !l.starts_with("@@END"))
        .filter_map(|line| {
            let mut words = line.splitn(3, ' ');
            let (load, config, json) = (words.next()?, words.next()?, words.next()?);
            let value: Value = serde_json::from_str(json).ok()?;
            let per_second = value["calls_per_second"].as_f64().or_else(|| value["binds_per_second"].as_f64())?;
            Some(Cost { kernel: kernel.to_owned(), load: load.to_owned(), config: config.to_owned(), per_second })
        })
        .collect()
}

/// The emulated cost table (medians per kernel, load and configuration, as ratios to the
/// untraced run): printed and written to target/vm/costs.json. Indicative only: TCG
/// emulates the CPU, so the ratios, not the rates, are what to read.
pub(super) fn report_costs(costs: &[Cost]) -> Result<()> {
    let mut keys: Vec<(String, String, String)> =
        costs.iter().map(|c| (c.kernel.clone(), c.load.clone(), c.config.clone())).collect();
    keys.sort();
    keys.dedup();
    let median = |kernel: &str, load: &str, config: &str| {
        let mut values: Vec<f64> = costs
            .iter()
            .filter(|c| c.kernel == kernel && c.load == load && c.config == config)
            .map(|c| c.per_second)
            .collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    };
    let mut table = String::from(
        "\n### emulated (QEMU TCG, indicative only): ratio to untraced, median of 3 rounds\n\n| kernel | load | backend | per second | ratio |\n| --- | --- | --- | ---: | ---: |\n",
    );
    let mut rows = Vec::new();
    for (kernel, load, config) in keys.iter().filter(|(_, _, c)| c != "untraced") {
        let (Some(rate), Some(base)) = (median(kernel, load, config), median(kernel, load, "untraced")) else {
            continue;
        };
        table.push_str(&format!("| {kernel} | {load} | {config} | {rate:.0} | {:.2} |\n", rate / base));
        rows.push(serde_json::json!({"kernel": kernel, "load": load, "backend": config, "per_second": rate, "untraced": base, "ratio": rate / base}));
    }
    println!("{table}");
    let path = workspace_root().join("target/vm/costs.json");
    std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    eprintln!("xtask: vm: emulated costs in {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_section_is_read() {
        let console =
            "@@BACKEND kprobe exit=0\n@@COSTS\ncollateral untraced {\"calls\":100,\"calls_per_second\":1000.0}\n\
                       storm kprobe {\"binds\":10,\"binds_per_second\":50.5}\nnoise\n@@END\n";
        let costs = parse_costs("6.1", console);
        assert_eq!(costs.len(), 2);
        assert_eq!(
            (costs[0].load.as_str(), costs[0].config.as_str(), costs[0].per_second),
            ("collateral", "untraced", 1000.0)
        );
        assert_eq!((costs[1].load.as_str(), costs[1].config.as_str(), costs[1].per_second), ("storm", "kprobe", 50.5));
        assert!(parse_costs("6.1", "@@BACKEND kprobe exit=0\n@@END\n").is_empty());
    }
}
