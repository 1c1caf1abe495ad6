//! Decoding of V8's sampling heap profile (`HeapProfiler.getSamplingProfile`) into live
//! JS stacks.
//!
//! V8 keeps one sample per `interval` allocated bytes on average (Poisson) and drops the
//! samples whose objects the garbage collector freed, so the profile holds live objects
//! only. Each node of its call tree carries `selfSize`, V8's estimate of the live bytes
//! allocated with that exact stack: a sampled object of `s` bytes stands for
//! `n = round(1 / (1 - exp(-s / interval)))` objects, and the protocol gives each sample
//! as `s * n` bytes, already scaled. The object count `n` itself is not in the protocol
//! (and cannot be told from `s * n` for objects far smaller than the interval), so a
//! stack's count is its number of live samples.
//!
//! The agent sends the tree flattened (each node with its parent's id) so that neither
//! side recurses on a depth the target controls.

use std::collections::HashMap;

use serde::Deserialize;

use crate::report::{Frame, FrameKind};

/// The script name the agent is evaluated under: its own objects (its socket's buffers,
/// its closures) are memtrace's, not the application's, and are left out.
pub const AGENT_URL: &str = "memtrace-jsheap-agent.js";

/// One stack of live JS objects.
#[derive(Clone, Debug, PartialEq)]
pub struct JsStack {
    /// Leaf first (the function that allocated, then its callers).
    pub frames: Vec<Frame>,
    /// V8's estimate of the live bytes allocated at this stack.
    pub bytes: u64,
    /// Live samples behind the estimate (few samples mean a rough one), not objects.
    pub count: u64,
}

/// The profile as the agent sends it.
#[derive(Debug, Default, Deserialize)]
pub struct FlatProfile {
    /// Parents before children.
    pub nodes: Vec<FlatNode>,
    #[serde(default)]
    pub samples: Vec<Sample>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlatNode {
    pub id: u64,
    /// 0 for the root.
    #[serde(default)]
    pub parent: u64,
    pub call_frame: CallFrame,
    #[serde(default)]
    pub self_size: f64,
}

/// V8's `Runtime.CallFrame`: the function, not the allocating line.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallFrame {
    #[serde(default)]
    pub function_name: String,
    #[serde(default)]
    pub url: String,
    /// 0-based; -1 for builtins without a script.
    #[serde(default)]
    pub line_number: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    /// Already scaled: the bytes this sample stands for.
    #[serde(default)]
    pub size: f64,
    pub node_id: u64,
}

/// Frames kept of a stack, from the leaf. V8 samples 128 frames deep by default; the tree
/// comes from the target, and a chain of a million nodes must not cost a million squared
/// steps.
pub const MAX_DEPTH: usize = 256;

/// Names V8 gives to tree nodes that are no function: the root, and the VM states it
/// records when an allocation has no JS frame (`(V8 API)`, `(GC)`, `(EXTERNAL)`, ...).
fn is_pseudo_frame(frame: &CallFrame) -> bool {
    frame.url.is_empty() && frame.function_name.starts_with('(') && frame.function_name.ends_with(')')
}

fn to_frame(frame: &CallFrame) -> Frame {
    Frame {
        function: if frame.function_name.is_empty() {
            "(anonymous)".to_string()
        } else {
            frame.function_name.clone()
        },
        module: String::new(),
        file: frame.url.clone(),
        line: u32::try_from(frame.line_number.saturating_add(1)).unwrap_or(0),
        kind: FrameKind::Js,
    }
}

/// Live stacks of `profile`, most bytes first, without the agent's own. Nodes that map to the same frames (the
/// same function at another column) are merged. A stack whose frames are all V8 pseudo
/// frames keeps its innermost one (e.g. `(V8 API)`: objects made by native code), so
/// that no live byte goes missing.
#[must_use]
pub fn live_stacks(profile: &FlatProfile) -> Vec<JsStack> {
    let index: HashMap<u64, usize> = profile.nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let mut samples_of: HashMap<u64, u64> = HashMap::new();
    for sample in &profile.samples {
        *samples_of.entry(sample.node_id).or_default() += 1;
    }
    let mut merged: HashMap<Vec<Frame>, JsStack> = HashMap::new();
    for node in &profile.nodes {
        if node.self_size < 0.5 {
            continue;
        }
        let mut frames = Vec::new();
        let mut innermost_pseudo = None;
        let mut agents = false;
        let mut at = Some(node);
        // A malformed tree (a cycle) must not loop: no stack is longer than the tree.
        let mut steps = 0;
        while let Some(n) = at {
            agents |= n.call_frame.url == AGENT_URL;
            if is_pseudo_frame(&n.call_frame) {
                innermost_pseudo.get_or_insert(n);
            } else {
                frames.push(to_frame(&n.call_frame));
            }
            steps += 1;
            if n.parent == 0 || steps > profile.nodes.len() || steps >= MAX_DEPTH {
                break;
            }
            at = index.get(&n.parent).map(|&i| &profile.nodes[i]);
        }
        if agents {
            continue;
        }
        if frames.is_empty() {
            let Some(pseudo) = innermost_pseudo else { continue };
            frames.push(to_frame(&pseudo.call_frame));
        }
        let stack = merged.entry(frames).or_insert_with_key(|frames| JsStack {
            frames: frames.clone(),
            bytes: 0,
            count: 0,
        });
        // Sizes are the target's to state: a sum past u64::MAX saturates.
        stack.bytes = stack.bytes.saturating_add(node.self_size.round() as u64);
        stack.count = stack.count.saturating_add(samples_of.get(&node.id).copied().unwrap_or_default());
    }
    let mut stacks: Vec<JsStack> = merged.into_values().collect();
    stacks.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.frames.len().cmp(&b.frames.len())));
    stacks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, parent: u64, name: &str, url: &str, line: i64, self_size: f64) -> FlatNode {
        FlatNode {
            id,
            parent,
            call_frame: CallFrame { function_name: name.into(), url: url.into(), line_number: line },
            self_size,
        }
    }

    #[test]
    fn stacks_are_leaf_first_without_the_root_and_lines_are_one_based() {
        let profile = FlatProfile {
            nodes: vec![
                node(1, 0, "(root)", "", -1, 0.0),
                node(2, 1, "listOnTimeout", "node:internal/timers", 523, 0.0),
                node(3, 2, "", "/srv/app.js", 9, 100.0),
                node(4, 3, "keepJob", "/srv/app.js", 4, 1000.0),
                node(5, 4, "push", "", -1, 50.0),
            ],
            samples: vec![Sample { size: 1000.0, node_id: 4 }],
        };
        let stacks = live_stacks(&profile);
        assert_eq!(stacks.len(), 3);
        let top = &stacks[0];
        assert_eq!(top.bytes, 1000);
        assert_eq!(top.count, 1);
        let names: Vec<(&str, &str, u32)> =
            top.frames.iter().map(|f| (f.function.as_str(), f.file.as_str(), f.line)).collect();
        assert_eq!(
            names,
            [
                ("keepJob", "/srv/app.js", 5),
                ("(anonymous)", "/srv/app.js", 10),
                ("listOnTimeout", "node:internal/timers", 524)
            ]
        );
        assert!(top.frames.iter().all(|f| f.kind == FrameKind::Js));
        // A builtin has no script: no file, line 0.
        assert_eq!((stacks[2].frames[0].function.as_str(), stacks[2].frames[0].line), ("push", 0));
    }

    /// An agent reply recorded here: `js_heap_keep.js 3` (20,000 jobs kept, 5.6 MiB by the
    /// garbage collector) on node v20.20.2, sampled every 16 KiB, with the agent's own
    /// objects (66 KB) in it.
    const RECORDED: &str = include_str!("testdata/agent-reply.json");

    #[test]
    fn a_recorded_profile_names_the_keeping_function_and_leaves_the_agent_out() {
        let reply: serde_json::Value = serde_json::from_str(RECORDED).expect("recorded reply");
        let profile: FlatProfile =
            serde_json::from_value(reply["profile"].clone()).expect("the recorded profile decodes");
        assert_eq!(profile.samples.len(), 381);
        let stacks = live_stacks(&profile);
        let top = &stacks[0];
        let frames: Vec<(&str, &str, u32)> = top
            .frames
            .iter()
            .map(|f| (f.function.as_str(), f.file.rsplit('/').next().unwrap_or_default(), f.line))
            .collect();
        assert_eq!(
            frames,
            [
                ("keepJob", "js_heap_keep.js", 40),
                ("(anonymous)", "js_heap_keep.js", 76),
                ("listOnTimeout", "timers", 524),
                ("processTimers", "timers", 504),
            ]
        );
        assert_eq!(top.frames[2].file, "node:internal/timers", "node:internal frames are kept");
        assert_eq!((top.bytes, top.count), (6_305_032, 374));
        let total: u64 = stacks.iter().map(|s| s.bytes).sum();
        assert_eq!(total, 6_337_896, "all sampled live bytes but the agent's");
        assert!(stacks.iter().all(|s| s.frames.iter().all(|f| f.file != AGENT_URL)));
    }

    #[test]
    fn a_stack_of_only_pseudo_frames_keeps_the_innermost() {
        let profile = FlatProfile {
            nodes: vec![node(1, 0, "(root)", "", -1, 0.0), node(2, 1, "(V8 API)", "", -1, 4096.0)],
            samples: vec![],
        };
        let stacks = live_stacks(&profile);
        assert_eq!(stacks.len(), 1);
        assert_eq!(stacks[0].frames.len(), 1);
        assert_eq!(stacks[0].frames[0].function, "(V8 API)");
        assert_eq!(stacks[0].bytes, 4096);
    }

    #[test]
    fn a_deep_chain_is_cut_and_huge_sizes_saturate() {
        let n = 2_000u64;
        let nodes: Vec<FlatNode> =
            (1..=n).map(|id| node(id, id - 1, &format!("f{id}"), "/srv/app.js", 1, 1e30)).collect();
        let stacks = live_stacks(&FlatProfile { nodes, samples: Vec::new() });
        assert!(stacks.iter().all(|s| s.frames.len() <= MAX_DEPTH));
        let deepest =
            stacks.iter().find(|s| s.frames[0].function == format!("f{n}")).expect("the leaf's stack");
        assert_eq!(deepest.frames.len(), MAX_DEPTH, "cut at the cap, leaf first");
        assert_eq!(deepest.bytes, u64::MAX, "1e30 bytes saturate");
        let twice = vec![node(1, 0, "a", "/srv/app.js", 1, 1e19), node(2, 0, "a", "/srv/app.js", 1, 1e19)];
        let merged = live_stacks(&FlatProfile { nodes: twice, samples: Vec::new() });
        assert_eq!(merged[0].bytes, u64::MAX, "two nodes of one stack whose sum overflows");
    }

    #[test]
    fn a_cycle_does_not_hang() {
        let profile = FlatProfile {
            nodes: vec![node(1, 2, "a", "/a.js", 0, 10.0), node(2, 1, "b", "/a.js", 1, 10.0)],
            samples: vec![],
        };
        assert_eq!(live_stacks(&profile).len(), 2);
    }
}
