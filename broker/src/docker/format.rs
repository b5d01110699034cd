//! What the docker CLI prints, as docker prints it: the `--format`
//! Go-template subset (`{{.Field}}`, `{{.A.B}}`, `{{json .}}`,
//! `{{json .Field}}`, a leading `table`, `\t` and `\n`), docker's human
//! durations and sizes, and the rows of `ps` and `images`. Pure.

use serde_json::Value;

/// A template refused: the message after `airlock docker: `.
pub type Refused = String;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// `{{.A.B}}` (empty path: `{{.}}`).
    Field(Vec<String>),
    /// `{{json .A}}`.
    Json(Vec<String>),
}

/// A parsed `--format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// `table ...`: a header line first, columns aligned.
    pub table: bool,
    pieces: Vec<Piece>,
}

fn path(text: &str) -> Option<Vec<String>> {
    let rest = text.strip_prefix('.')?;
    if rest.is_empty() {
        return Some(Vec::new());
    }
    let parts: Vec<String> = rest.split('.').map(str::to_owned).collect();
    parts
        .iter()
        .all(|p| {
            p.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .then_some(parts)
}

impl Template {
    /// Parses a `--format` value.
    pub fn parse(format: &str) -> Result<Template, Refused> {
        let (table, body) = match format.strip_prefix("table") {
            Some(rest) => (true, rest.trim_start_matches(' ')),
            None => (false, format),
        };
        let body = body.replace("\\t", "\t").replace("\\n", "\n");
        let mut pieces = Vec::new();
        let mut rest = body.as_str();
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| format!("--format {format:?}: an unclosed {{{{"))?;
            let action = after[..end]
                .trim()
                .trim_start_matches('-')
                .trim_end_matches('-')
                .trim();
            let unsupported = || {
                format!(
                    "--format: {{{{{action}}}}} is not supported (only {{{{.Field}}}}, \
                     {{{{.A.B}}}}, {{{{json .}}}} and {{{{json .Field}}}})"
                )
            };
            let piece = if let Some(arg) = action.strip_prefix("json ") {
                Piece::Json(path(arg.trim()).ok_or_else(unsupported)?)
            } else {
                Piece::Field(path(action).ok_or_else(unsupported)?)
            };
            pieces.push(piece);
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(Template { table, pieces })
    }

    /// The template applied to `value`.
    pub fn render(&self, value: &Value) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(p) => out.push_str(&go_value(lookup(value, p))),
                Piece::Json(p) => {
                    out.push_str(&serde_json::to_string(lookup(value, p)).unwrap_or_default());
                }
            }
        }
        out
    }

    /// The header of a `table` template: each field's name in capitals,
    /// as docker's own headers (`{{.ID}}` → `CONTAINER ID`, `{{.Names}}` →
    /// `NAMES`).
    pub fn header(&self, names: &[(&str, &str)]) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(p) | Piece::Json(p) => {
                    let key = p.join(".");
                    let name = names
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map_or_else(|| key.to_uppercase(), |(_, h)| (*h).to_owned());
                    out.push_str(&name);
                }
            }
        }
        out
    }
}

fn lookup<'a>(value: &'a Value, path: &[String]) -> &'a Value {
    path.iter()
        .fold(value, |v, key| v.get(key).unwrap_or(&Value::Null))
}

/// A value as Go's `fmt` prints it in a template: strings bare, lists
/// `[a b]`, maps `map[k:v]` (keys sorted), nothing `<no value>`.
pub fn go_value(value: &Value) -> String {
    match value {
        Value::Null => "<no value>".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(go_value).collect::<Vec<_>>().join(" ")
        ),
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            format!(
                "map[{}]",
                keys.iter()
                    .map(|k| format!("{k}:{}", go_value(&map[*k])))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    }
}

/// Lines of tab-separated columns aligned as docker's tabwriter does
/// (padding 3, at least one column width per cell).
pub fn align(lines: &[String]) -> String {
    let rows: Vec<Vec<&str>> = lines.iter().map(|l| l.split('\t').collect()).collect();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < row.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] + 3 - cell.chars().count();
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// docker's `HumanDuration`: "Less than a second", "5 seconds", "About a
/// minute", "3 minutes", "About an hour", "2 hours", "3 days", "2 weeks",
/// "4 months", "2 years".
pub fn human_duration(secs: u64) -> String {
    let minutes = secs / 60;
    let hours = minutes / 60;
    match secs {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        s if s < 60 => format!("{s} seconds"),
        _ if minutes == 1 => "About a minute".into(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".into(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", hours / 24 / 365),
    }
}

/// docker's `HumanSize` (decimal units, 3 significant digits): "0B",
/// "512B", "1.5kB", "12.3MB", "1.07GB".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut unit = 0;
    // In thousandths, integer arithmetic only.
    let mut scaled = u128::from(bytes) * 1000;
    while scaled >= 1_000_000 && unit + 1 < UNITS.len() {
        scaled /= 1000;
        unit += 1;
    }
    let whole = scaled / 1000;
    let frac = scaled % 1000;
    let text = if whole >= 100 || unit == 0 {
        format!("{whole}")
    } else if whole >= 10 {
        format!("{whole}.{}", frac / 100)
    } else {
        format!("{whole}.{:02}", frac / 10)
    };
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    };
    format!("{text}{}", UNITS[unit])
}

/// A UNIX time as docker's `CreatedAt`: `2026-12-04 16:22:35 +0000 UTC`.
pub fn created_at(unix: u64) -> String {
    let days = unix / 86_400;
    let rem = unix % 86_400;
    let (y, m, d) = crate::audit::time::civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} +0000 UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What a container's row says in `ps`: docker's field names, all strings.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub id: String,
    pub image: String,
    pub command: Vec<String>,
    pub created_unix: u64,
    pub running: bool,
    pub exit_code: Option<i64>,
    pub ended_unix: Option<u64>,
    pub names: String,
    pub labels: Vec<(String, String)>,
    pub mounts: Vec<String>,
}

impl Row {
    /// docker's `Status` column.
    pub fn status(&self, now: u64) -> String {
        if self.running {
            format!(
                "Up {}",
                human_duration(now.saturating_sub(self.created_unix))
            )
        } else {
            let ago = self.ended_unix.map_or_else(String::new, |t| {
                format!(" {} ago", human_duration(now.saturating_sub(t)))
            });
            format!("Exited ({}){ago}", self.exit_code.unwrap_or(0))
        }
    }

    /// The row as docker's `{{json .}}` object; `no_trunc` keeps the ID and
    /// command whole.
    pub fn to_json(&self, now: u64, no_trunc: bool) -> Value {
        let id = if no_trunc {
            self.id.clone()
        } else {
            self.id.chars().take(12).collect()
        };
        let joined = self.command.join(" ");
        let command = if no_trunc || joined.chars().count() <= 20 {
            joined
        } else {
            format!("{}…", joined.chars().take(19).collect::<String>())
        };
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        serde_json::json!({
            "Command": format!("\"{command}\""),
            "CreatedAt": created_at(self.created_unix),
            "ID": id,
            "Image": self.image,
            "Labels": labels.join(","),
            "LocalVolumes": "0",
            "Mounts": self.mounts.join(","),
            "Names": self.names,
            "Networks": "none",
            "Ports": "",
            "RunningFor": format!("{} ago", human_duration(now.saturating_sub(self.created_unix))),
            "Size": "0B",
            "State": if self.running { "running" } else { "exited" },
            "Status": self.status(now),
        })
    }
}

/// docker's headers for `ps` columns.
pub const PS_HEADERS: &[(&str, &str)] = &[
    ("ID", "CONTAINER ID"),
    ("Image", "IMAGE"),
    ("Command", "COMMAND"),
    ("CreatedAt", "CREATED AT"),
    ("RunningFor", "CREATED"),
    ("Status", "STATUS"),
    ("Ports", "PORTS"),
    ("Names", "NAMES"),
    ("Labels", "LABELS"),
    ("State", "STATE"),
    ("Mounts", "MOUNTS"),
    ("Networks", "NETWORKS"),
    ("Size", "SIZE"),
];

/// `ps`'s default table.
pub const PS_DEFAULT: &str =
    "table {{.ID}}\t{{.Image}}\t{{.Command}}\t{{.RunningFor}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}";

/// docker's headers for `images` columns.
pub const IMAGES_HEADERS: &[(&str, &str)] = &[
    ("Repository", "REPOSITORY"),
    ("Tag", "TAG"),
    ("ID", "IMAGE ID"),
    ("CreatedSince", "CREATED"),
    ("CreatedAt", "CREATED AT"),
    ("Size", "SIZE"),
    ("Digest", "DIGEST"),
];

/// `images`'s default table.
pub const IMAGES_DEFAULT: &str =
    "table {{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}";

/// Renders `rows` with `template` (a table: header first, aligned).
pub fn render_all(template: &Template, headers: &[(&str, &str)], rows: &[Value]) -> String {
    let mut lines = Vec::new();
    if template.table {
        lines.push(template.header(headers));
    }
    for row in rows {
        lines.push(template.render(row));
    }
    if template.table {
        align(&lines)
    } else {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_render_fields_json_and_tables() {
        let row = json!({"Names": "a", "ID": "0123456789ab", "Labels": "k=v", "Config": {"Cmd": ["sh", "-c"], "User": ""}});
        let t = Template::parse("{{.Names}}").expect("parses");
        assert_eq!(t.render(&row), "a");
        let t = Template::parse("{{.ID}}\\t{{ .Names }}").expect("parses");
        assert_eq!(t.render(&row), "0123456789ab\ta");
        let t = Template::parse("{{json .Config.Cmd}}").expect("parses");
        assert_eq!(t.render(&row), r#"["sh","-c"]"#);
        let t = Template::parse("{{.Config.Cmd}} {{.Missing}}").expect("parses");
        assert_eq!(t.render(&row), "[sh -c] <no value>");
        let t = Template::parse("{{json .}}").expect("parses");
        let back: Value = serde_json::from_str(&t.render(&row)).expect("json");
        assert_eq!(back, row);
        let t = Template::parse("table {{.Names}}\\t{{.ID}}").expect("parses");
        assert!(t.table);
        let out = render_all(&t, PS_HEADERS, &[row]);
        assert_eq!(out, "NAMES   CONTAINER ID\na       0123456789ab\n");
    }

    #[test]
    fn templates_beyond_the_subset_are_refused() {
        for bad in [
            "{{range .}}{{end}}",
            "{{if .Names}}x{{end}}",
            "{{.Names",
            "{{printf \"%s\" .Names}}",
            "{{.Label \"k\"}}",
            "{{.a-b}}",
        ] {
            let e = Template::parse(bad).expect_err(bad);
            assert!(e.starts_with("--format"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations_sizes_and_dates_read_as_dockers() {
        assert_eq!(human_duration(0), "Less than a second");
        assert_eq!(human_duration(1), "1 second");
        assert_eq!(human_duration(59), "59 seconds");
        assert_eq!(human_duration(61), "About a minute");
        assert_eq!(human_duration(600), "10 minutes");
        assert_eq!(human_duration(3700), "About an hour");
        assert_eq!(human_duration(5 * 3600), "5 hours");
        assert_eq!(human_duration(3 * 86400), "3 days");
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(1500), "1.5kB");
        assert_eq!(human_size(12_345_678), "12.3MB");
        assert_eq!(human_size(1_073_741_824), "1.07GB");
        assert_eq!(created_at(0), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(created_at(1_796_400_155), "2026-12-04 16:02:35 +0000 UTC");
    }

    #[test]
    fn rows_say_status_and_truncate_as_docker() {
        let row = Row {
            id: "a".repeat(64),
            image: "agent:latest".into(),
            command: vec![
                "bash".into(),
                "-c".into(),
                "exec bun run /app/src/index.ts".into(),
            ],
            created_unix: 1000,
            running: true,
            names: "n".into(),
            labels: vec![("k".into(), "v".into()), ("x".into(), String::new())],
            ..Row::default()
        };
        let j = row.to_json(1005, false);
        assert_eq!(j["ID"], "a".repeat(12));
        assert_eq!(j["Status"], "Up 5 seconds");
        assert_eq!(j["State"], "running");
        assert_eq!(j["Labels"], "k=v,x=");
        assert_eq!(j["Command"], "\"bash -c exec bun ru…\"");
        let stopped = Row {
            running: false,
            exit_code: Some(137),
            ended_unix: Some(1010),
            ..row
        };
        assert_eq!(stopped.status(1070), "Exited (137) About a minute ago");
        assert_eq!(stopped.to_json(1070, true)["ID"], "a".repeat(64));
    }
}
