//! Interactive SVG flamegraph (`--flamegraph`) drawn by inferno from the folded stacks.
//!
//! Colours come from a palette map filled before drawing, so they follow the frame's
//! kind (JavaScript green, native red, kernel orange, unknown grey) rather
//! than inferno's guesses from the name, and the same name always gets the same colour.

use std::io::Write;

use inferno::flamegraph::color::{BackgroundColor, Color, PaletteMap};
use inferno::flamegraph::{self, Options};

use super::ExportError;
use super::human::{bytes, duration, plural};
use super::stacks::{FlameValue, folded_label, folded_stacks};
use crate::report::{FrameKind, Report};

const WIDTH: usize = 1200;

/// Writes the flamegraph of `report`'s leaks weighed by `value`. A report without any
/// such stack still gets a valid SVG that says so.
pub fn write_flamegraph<W: Write>(report: &Report, value: FlameValue, mut out: W) -> Result<(), ExportError> {
    let title = title(report);
    let stacks = folded_stacks(report, value);
    if stacks.is_empty() {
        write_empty(&title, &mut out)?;
        out.flush()?;
        return Ok(());
    }
    let lines: Vec<String> = stacks.iter().map(|(stack, weight)| format!("{stack} {weight}")).collect();
    let mut palette = palette(report);
    // `Options` is non-exhaustive, so it is filled field by field.
    let mut options = Options::default();
    options.title = title;
    options.subtitle = Some(subtitle(report));
    options.count_name = value.unit().to_string();
    options.image_width = Some(WIDTH);
    options.bgcolors = Some(BackgroundColor::Grey);
    // Only consulted for names missing from the map; `hash` keeps it deterministic.
    options.hash = true;
    options.palette_map = Some(&mut palette);
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut out)
        .map_err(ExportError::Flamegraph)?;
    out.flush()?;
    Ok(())
}

fn title(report: &Report) -> String {
    let target = &report.target;
    let who = if target.comm.is_empty() {
        format!("pid {}", target.pid)
    } else {
        format!("{} (pid {})", target.comm, target.pid)
    };
    format!(
        "memtrace: {who}, {}, {} outstanding",
        duration(report.duration_s),
        bytes(report.totals.outstanding_bytes)
    )
}

fn subtitle(report: &Report) -> String {
    let legend = "JavaScript frames green, native red, kernel orange";
    if report.lost_events == 0 {
        legend.to_string()
    } else {
        format!(
            "WARNING: {} lost, figures are lower bounds. {legend}",
            plural(report.lost_events, "event", "events")
        )
    }
}

/// A colour per distinct frame label, chosen by the frame's kind. The first kind seen
/// for a label wins, in report order, so the result is deterministic.
fn palette(report: &Report) -> PaletteMap {
    let mut map = PaletteMap::default();
    // inferno's root frame ("all") has the empty name.
    map.insert("", Color { r: 0xc8, g: 0xc8, b: 0xc8 });
    for frame in report.all_suspects().flat_map(|leak| &leak.frames) {
        let label = folded_label(frame);
        if map.get(&label).is_none() {
            let color = color(frame.kind, &label);
            map.insert(label, color);
        }
    }
    // Leaks without frames are drawn as "[unknown]".
    if map.get("[unknown]").is_none() {
        map.insert("[unknown]", color(FrameKind::Unknown, "[unknown]"));
    }
    map
}

fn color(kind: FrameKind, label: &str) -> Color {
    // FNV-1a: a stable shade per name so neighbouring frames stay distinguishable.
    let hash = label
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let shade = |range: u8, shift: u32| ((hash >> shift) % (u64::from(range) + 1)) as u8;
    match kind {
        FrameKind::Js => Color { r: 50 + shade(60, 0), g: 190 + shade(60, 8), b: 50 + shade(60, 16) },
        FrameKind::Native => {
            // Red to pink: green and blue move together, which keeps it apart from orange.
            let pale = 50 + shade(80, 8);
            Color { r: 200 + shade(55, 0), g: pale, b: pale }
        }
        FrameKind::Kernel => Color { r: 230 + shade(25, 0), g: 130 + shade(40, 8), b: shade(40, 16) },
        FrameKind::Unknown => {
            let grey = 160 + shade(40, 0);
            Color { r: grey, g: grey, b: grey }
        }
    }
}

/// inferno refuses empty input (and would say "ERROR"), so an empty report gets this.
fn write_empty(title: &str, out: &mut impl Write) -> std::io::Result<()> {
    let center = WIDTH / 2;
    write!(
        out,
        r##"<?xml version="1.0" standalone="no"?>
<svg version="1.1" width="{WIDTH}" height="120" viewBox="0 0 {WIDTH} 120" xmlns="http://www.w3.org/2000/svg">
<rect x="0" y="0" width="100%" height="100%" fill="#f8f8f8"/>
<text x="{center}" y="36" text-anchor="middle" font-family="Verdana" font-size="17">{}</text>
<text x="{center}" y="76" text-anchor="middle" font-family="Verdana" font-size="12">No data: no outstanding memory was attributed to any stack.</text>
</svg>
"##,
        escape(title)
    )
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use quick_xml::events::Event;
    use quick_xml::reader::Reader;

    use super::*;
    use crate::export::fixture::sample_report;

    fn render(report: &Report) -> String {
        let mut out = Vec::new();
        write_flamegraph(report, FlameValue::Outstanding, &mut out).expect("render flamegraph");
        String::from_utf8(out).expect("SVG is UTF-8")
    }

    /// Parses the whole document, checking tags nest and close, entities resolve and there
    /// is one root, `<svg>`. Returns all text content.
    fn well_formed_svg(svg: &str) -> String {
        let mut reader = Reader::from_str(svg);
        let (mut depth, mut roots, mut text) = (0_usize, Vec::new(), String::new());
        loop {
            match reader.read_event().expect("well-formed XML") {
                Event::Start(tag) => {
                    if depth == 0 {
                        roots.push(String::from_utf8_lossy(tag.name().as_ref()).into_owned());
                    }
                    depth += 1;
                }
                Event::Empty(tag) if depth == 0 => {
                    roots.push(String::from_utf8_lossy(tag.name().as_ref()).into_owned());
                }
                Event::End(_) => depth = depth.checked_sub(1).expect("no stray end tag"),
                Event::Text(t) => {
                    text.push_str(&t.decode().expect("decodable text"));
                }
                Event::GeneralRef(r) => {
                    if let Some(c) = r.resolve_char_ref().expect("valid character reference") {
                        text.push(c);
                    } else {
                        let name = r.decode().expect("decodable reference");
                        let c = match name.as_ref() {
                            "amp" => '&',
                            "lt" => '<',
                            "gt" => '>',
                            "quot" => '"',
                            "apos" => '\'',
                            other => panic!("undefined entity &{other};"),
                        };
                        text.push(c);
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(depth, 0, "unclosed elements at the end of the document");
        assert_eq!(roots, ["svg"], "exactly one root element, <svg>");
        text
    }

    #[test]
    fn svg_is_well_formed_and_names_the_leak() {
        let svg = render(&sample_report());
        let text = well_formed_svg(&svg);
        assert!(text.contains("rememberOrder app.js:9"), "leaking JS function is drawn");
        assert!(text.contains("memtrace: node (pid 4242), 30.0s, 13.0 MiB outstanding"));
        assert!(text.contains("bytes"), "counts are labelled as bytes");
        assert!(text.contains("WARNING: 7 events lost"));
    }

    #[test]
    fn frame_kinds_get_their_own_colours() {
        let report = sample_report();
        let map = palette(&report);
        let js = map.get("rememberOrder app.js:9").expect("JS frame coloured");
        let native = map.get("malloc [libc.so.6]").expect("native frame coloured");
        let kernel = map.get("do_anonymous_page").expect("kernel frame coloured");
        assert!(js.g > js.r && js.g > js.b, "JS is green: {js:?}");
        assert!(native.r >= 200 && native.g == native.b && native.b >= 50, "native is red: {native:?}");
        assert!(kernel.r >= 230 && kernel.g >= 130 && kernel.b <= 40, "kernel is orange: {kernel:?}");
        // The colours end up in the SVG.
        let svg = render(&report);
        assert!(svg.contains(&format!("rgb({},{},{})", js.r, js.g, js.b)));
    }

    #[test]
    fn empty_report_gives_a_valid_svg_saying_no_data() {
        let mut report = Report::default();
        report.target.comm = "a<b&c".to_string();
        let svg = render(&report);
        let text = well_formed_svg(&svg);
        assert!(text.contains("No data"));
        assert!(text.contains("memtrace: a<b&c (pid 0)"));
    }
}
