//! The README's examples are executed: every command in the `sh` blocks of its "Using it"
//! section runs, in order, with `bash` against one fresh server, and must exit 0 and print
//! the answer shown under it, so the documentation cannot drift from what tally does.
//!
//! How the README is read:
//! - The blocks: every block fenced as ```` ```sh ```` between the line `## Using it` and the
//!   next line starting with `## `.
//! - A command starts on a line that is neither blank nor a comment, and goes on over
//!   following lines while the text so far ends in `\` or has a quote left open (bash then
//!   reads it as written). Comment lines (`#`) between commands are not run.
//! - A command's shown answer is a `# → ` line right after it, continued by the lines right
//!   after that which start with `#` and three spaces (so the text lines up under the first
//!   line's); those four characters are cut off each continuation line.
//! - Before running, `localhost:8080` and `127.0.0.1:8080` become the test server's address,
//!   in the commands and in the answers; `tally` is the binary under test (its directory
//!   first in `PATH`), `TALLY_SERVER` names the server, and the working directory is an
//!   empty temporary one.
//!
//! How an answer is compared with the command's standard output (`…` stands for a value
//! that depends on when the example runs):
//! - A shown answer that is JSON once its `…`s are read as below is compared structurally
//!   (members in any order): a `…` in a value's place matches any value; a `…` as the last
//!   member of an object or the last element of an array means more may follow; inside a
//!   string, `…` matches any run of characters. Everything else must be equal.
//! - Otherwise the answer is text, compared line by line (trailing spaces ignored), with
//!   `…` matching any run of characters within a line.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Fewer commands or answers than this means the README's extraction broke (or examples
/// were removed: then lower these on purpose).
const COMMANDS_MIN: usize = 33;
const ANSWERS_MIN: usize = 27;

/// Time the examples are given to run in one clock hour, seconds: their hour series and
/// local days assume events and queries fall in the same hour (they run in a few seconds).
const HOUR_MARGIN_SECS: u64 = 120;

/// A `…` outside a JSON string, in a value's place.
const ANY: &str = "\u{1}any";
/// A `…` as the last member of an object or element of an array.
const MORE: &str = "\u{1}more";

#[derive(Debug)]
struct Example {
    /// Line in README.md where the command starts (1-based).
    line: usize,
    command: String,
    answer: Option<String>,
}

#[test]
fn readme_examples_give_the_answers_shown() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let examples = examples(&readme);
    let answers = examples.iter().filter(|e| e.answer.is_some()).count();
    assert!(
        examples.len() >= COMMANDS_MIN && answers >= ANSWERS_MIN,
        "only {} commands and {answers} answers found in README.md's \"Using it\" blocks \
         (expected at least {COMMANDS_MIN} and {ANSWERS_MIN}): {examples:#?}",
        examples.len()
    );

    let (_dir, server) = common::server("");
    let work_dir = tempfile::tempdir().unwrap();
    wait_out_hour_boundary();
    let hour_at_start = hour_now();
    let mut failures = Vec::new();
    for example in &examples {
        if let Some(failure) = run(example, &server.url(), work_dir.path()) {
            failures.push(failure);
        }
    }
    assert_eq!(hour_at_start, hour_now(), "the examples ran across an hour boundary: run again");
    assert!(
        failures.is_empty(),
        "{} of {} README examples failed:\n\n{}",
        failures.len(),
        examples.len(),
        failures.join("\n\n")
    );
    println!("{} README commands run, {answers} answers checked", examples.len());
}

/// Runs one example; a description of what went wrong, if anything did.
fn run(example: &Example, url: &str, work_dir: &Path) -> Option<String> {
    let local = |text: &str| {
        let address = url.trim_start_matches("http://");
        text.replace("localhost:8080", address).replace("127.0.0.1:8080", address)
    };
    let command = local(&example.command);
    let binary_dir = Path::new(common::tally_binary()).parent().unwrap();
    let path = std::env::join_paths(
        std::iter::once(binary_dir.to_path_buf()).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let output = Command::new("bash")
        .args(["-o", "pipefail", "-c", &command])
        .current_dir(work_dir)
        .env("PATH", path)
        .env("TALLY_SERVER", url)
        .env_remove("TALLY_KEY")
        .env_remove("TALLY_CA_FILE")
        .stdin(Stdio::null())
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let describe = |problem: &str| {
        format!("README.md line {}: {problem}\n$ {command}\nstdout:\n{stdout}\nstderr:\n{stderr}", example.line)
    };
    if !output.status.success() {
        return Some(describe(&format!("exited with {}", output.status)));
    }
    let shown = local(example.answer.as_deref()?);
    (!answer_matches(&shown, &stdout)).then(|| describe(&format!("answer differs from the one shown:\n{shown}")))
}

/// Waits, if the clock is within `HOUR_MARGIN_SECS` of the next hour, until it has passed.
fn wait_out_hour_boundary() {
    let into_hour = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() % 3600;
    if into_hour >= 3600 - HOUR_MARGIN_SECS {
        std::thread::sleep(Duration::from_secs(3600 - into_hour + 1));
    }
}

fn hour_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() / 3600
}

/// The lines of the `sh` blocks between `## Using it` and the next `## ` heading, with
/// their line numbers.
fn using_it_lines(readme: &str) -> Vec<(usize, &str)> {
    let mut lines = readme.lines().enumerate().map(|(index, line)| (index + 1, line));
    lines.by_ref().find(|(_, line)| *line == "## Using it").expect("README.md has a \"## Using it\" section");
    let mut in_sh_block = false;
    let mut found = Vec::new();
    for (number, line) in lines.take_while(|(_, line)| !line.starts_with("## ")) {
        if line.starts_with("```") {
            in_sh_block = !in_sh_block && line == "```sh";
        } else if in_sh_block {
            found.push((number, line));
        }
    }
    found
}

/// The commands of the "Using it" blocks, in order, each with the answer shown under it.
fn examples(readme: &str) -> Vec<Example> {
    let mut examples: Vec<Example> = Vec::new();
    let mut open: Option<Example> = None;
    let mut answer_open = false;
    for (number, line) in using_it_lines(readme) {
        let line = line.trim_end();
        if let Some(mut example) = open.take() {
            example.command.push('\n');
            example.command.push_str(line);
            if needs_more(&example.command) {
                open = Some(example);
            } else {
                examples.push(example);
            }
            continue;
        }
        if let (true, Some(more)) = (answer_open, line.strip_prefix("#   ")) {
            let answer = examples.last_mut().and_then(|e| e.answer.as_mut()).expect("an answer is open");
            answer.push('\n');
            answer.push_str(more);
        } else if let Some(shown) = line.strip_prefix("# → ") {
            let example = examples.last_mut().unwrap_or_else(|| panic!("line {number}: an answer before any command"));
            assert!(
                example.answer.is_none(),
                "line {number}: a second answer for the command on line {}",
                example.line
            );
            example.answer = Some(shown.to_string());
            answer_open = true;
            continue;
        } else if !line.is_empty() && !line.starts_with('#') {
            let example = Example { line: number, command: line.to_string(), answer: None };
            if needs_more(&example.command) {
                open = Some(example);
            } else {
                examples.push(example);
            }
        }
        answer_open = answer_open && line.starts_with("#   ");
    }
    assert!(open.is_none(), "a command is not finished where its block ends: {open:?}");
    examples
}

/// Whether shell text goes on over the next line: it ends in a `\`, or a quote is open.
/// `$(…)` needs no tracking: quotes inside it come in pairs.
fn needs_more(text: &str) -> bool {
    let mut quote: Option<char> = None;
    let mut previous = '\n';
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some('\''), '\'') | (Some('"'), '"') => quote = None,
            (Some('\''), _) => {}
            (_, '\\') => {
                // An escaped character; a backslash ending the text continues it.
                let escaped = chars.next();
                if escaped.is_none() {
                    return true;
                }
            }
            (None, '\'' | '"') => quote = Some(c),
            (None, '#') if previous.is_whitespace() => {
                // A comment, up to the end of its line.
                let next_line = chars.by_ref().any(|c| c == '\n');
                if !next_line {
                    return false;
                }
                previous = '\n';
                continue;
            }
            _ => {}
        }
        previous = c;
    }
    quote.is_some()
}

fn answer_matches(shown: &str, actual: &str) -> bool {
    match serde_json::from_str::<Value>(&json_pattern(shown)) {
        Ok(pattern) => serde_json::from_str::<Value>(actual.trim()).is_ok_and(|value| json_matches(&pattern, &value)),
        Err(_) => {
            let actual: Vec<&str> = actual.trim_end().lines().map(str::trim_end).collect();
            let shown: Vec<&str> = shown.lines().map(str::trim_end).collect();
            shown.len() == actual.len() && shown.iter().zip(&actual).all(|(s, a)| glob(s, a))
        }
    }
}

/// `shown` with each `…` outside a string made a JSON string: `MORE` as the last element
/// of an array, a `MORE: null` member as the last member of an object, `ANY` elsewhere.
fn json_pattern(shown: &str) -> String {
    let mut pattern = String::new();
    let mut in_string = false;
    let mut escaped = false;
    for (index, c) in shown.char_indices() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
            pattern.push(c);
            continue;
        }
        if c != '…' {
            in_string = c == '"';
            pattern.push(c);
            continue;
        }
        let next = shown[index + c.len_utf8()..].trim_start().chars().next();
        let after_colon = pattern.trim_end().ends_with(':');
        let literal = match next {
            Some('}') if !after_colon => format!("\"{MORE}\":null"),
            Some(']') => format!("\"{MORE}\""),
            _ => format!("\"{ANY}\""),
        };
        pattern.push_str(&literal.replace('\u{1}', "\\u0001"));
    }
    pattern
}

fn json_matches(shown: &Value, actual: &Value) -> bool {
    match (shown, actual) {
        (Value::String(s), _) if s == ANY => true,
        (Value::String(s), Value::String(a)) => glob(s, a),
        (Value::Object(shown), Value::Object(actual)) => {
            let more = shown.contains_key(MORE);
            let members = shown.len() - usize::from(more);
            (more || members == actual.len())
                && shown
                    .iter()
                    .filter(|(name, _)| *name != MORE)
                    .all(|(name, value)| actual.get(name).is_some_and(|a| json_matches(value, a)))
        }
        (Value::Array(shown), Value::Array(actual)) => {
            let more = shown.last().is_some_and(|last| last == MORE);
            let elements = &shown[..shown.len() - usize::from(more)];
            (if more { actual.len() >= elements.len() } else { actual.len() == elements.len() })
                && elements.iter().zip(actual).all(|(s, a)| json_matches(s, a))
        }
        _ => shown == actual,
    }
}

/// Whether `text` is `pattern` with each `…` standing for any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('…');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[test]
fn the_matcher_reads_wildcards_as_documented() {
    assert!(answer_matches(r#"{"a":1,"b":…}"#, r#"{"b":[2],"a":1}"#));
    assert!(!answer_matches(r#"{"a":1,"b":…}"#, r#"{"a":1}"#));
    assert!(!answer_matches(r#"{"a":1}"#, r#"{"a":1,"b":2}"#));
    assert!(answer_matches(r#"{"a":1,…}"#, r#"{"a":1,"b":2}"#));
    assert!(!answer_matches(r#"{"a":2,…}"#, r#"{"a":1,"b":2}"#));
    assert!(answer_matches(r#"[{"t":"…","n":0},…]"#, r#"[{"t":"x","n":0},{"t":"y","n":1}]"#));
    assert!(!answer_matches(r#"[{"t":"…","n":0}]"#, r#"[{"t":"x","n":0},{"t":"y","n":1}]"#));
    assert!(!answer_matches(r#"{"p":"…"}"#, r#"{"p":1}"#));
    assert!(answer_matches(r#"{"t":"…T00:00:00+01:00"}"#, r#"{"t":"2025-10-27T00:00:00+01:00"}"#));
    assert!(!answer_matches(r#"{"t":"…T00:00:00+01:00"}"#, r#"{"t":"2025-10-26T00:00:00+02:00"}"#));
    assert!(answer_matches(r#"{"avg":9000.0}"#, r#"{"avg":9000.0}"#));
    assert!(answer_matches(
        "3 view of v1 from … to … (minute resolution)\nnext",
        "3 view of v1 from a to b (minute resolution)\nnext  \n"
    ));
    assert!(!answer_matches("3 view of v1 from …", "4 view of v1 from a"));
    assert!(!answer_matches("one\ntwo", "one"));
    assert!(glob("a…b…c", "abc") && glob("…", "") && !glob("a…a", "a") && glob("x…", "xyz"));
}

#[test]
fn commands_are_read_whole() {
    assert!(needs_more("curl -d '{\"a\": 1,"));
    assert!(needs_more("curl localhost \\"));
    assert!(!needs_more("curl -d '{\"a\": 1,\n  \"b\": 2}'   # it's a comment"));
    assert!(!needs_more("curl \"x=$(date -u -d '1 hour ago' +%F)\""));
    assert!(!needs_more("a # it's\n# it's"));
    assert!(needs_more("echo \"$(date -d 'x')"));
    let readme = "## Using it\n\n```sh\n# a comment\ncurl a \\\n  b\n# → {\"a\":\n#    1}\n\n\
                  echo 'x\n#y'\n# → x\n#   #y\n#   not a comment\n```\n\n```text\nnot run\n```\n## Next\n```sh\nnot run\n```\n";
    let examples = examples(readme);
    assert_eq!(examples.len(), 2, "{examples:?}");
    assert_eq!((examples[0].line, examples[0].command.as_str()), (5, "curl a \\\n  b"));
    assert_eq!(examples[0].answer.as_deref(), Some("{\"a\":\n 1}"));
    assert_eq!(examples[1].command, "echo 'x\n#y'");
    assert_eq!(examples[1].answer.as_deref(), Some("x\n#y\nnot a comment"));
}
