//! Jobs read from a JSON-lines or CSV file for `balsam job --from-file`, one at a time, each line
//! parsed once.
//!
//! The input is read as a stream, once: it may be a pipe (`--from-file -` or `/dev/stdin`) or a
//! process substitution, which cannot be read twice. A UTF-8 byte-order mark (which spreadsheet
//! programs write) is skipped. Every problem is reported as `FILE:LINE: what is wrong`.
//!
//! CSV: a quoted field may not run over several lines. A record that did would most likely be an
//! unterminated quote swallowing the rows after it into one field (and those jobs would silently
//! vanish); no job field holds a line break, so such a file is refused, naming the line where the
//! quote opened.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{anyhow, Result};
use balsam_store::fields::{self, Value};
use balsam_store::{Error as StoreError, ImportLine, JobSpec, NewJob, Uuid};

/// The UTF-8 byte-order mark.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// How the jobs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    JsonLines,
    /// A header of field names, then one job per row.
    Csv,
}

/// Opens `file` (`-`: standard input) as a stream without a byte-order mark; returns it with
/// the name used in messages.
pub fn open(file: &Path) -> Result<(Box<dyn BufRead + Send>, String)> {
    let (raw, name): (Box<dyn Read + Send>, String) = if file == Path::new("-") {
        (Box::new(std::io::stdin()), "<stdin>".to_string())
    } else {
        let f = std::fs::File::open(file)
            .map_err(|e| anyhow!("cannot open {}: {e}", file.display()))?;
        (Box::new(f), file.display().to_string())
    };
    let reader = skip_bom(raw).map_err(|e| anyhow!("{name}: cannot read: {e}"))?;
    Ok((Box::new(BufReader::with_capacity(1 << 16, reader)), name))
}

/// The stream without a leading byte-order mark.
fn skip_bom(mut r: Box<dyn Read + Send>) -> std::io::Result<Box<dyn Read + Send>> {
    let mut head = [0u8; 3];
    let mut n = 0;
    while n < head.len() {
        match r.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if &head[..n] == BOM {
        Ok(r)
    } else {
        Ok(Box::new(std::io::Cursor::new(head[..n].to_vec()).chain(r)))
    }
}

/// `FILE:LINE: what`, as the store reports a bad line of an import.
fn at_line(file: &str, line: usize, e: StoreError) -> StoreError {
    StoreError::BadLine {
        file: file.to_string(),
        line,
        source: Box::new(e),
    }
}

/// The jobs of an input, in order, each with its line number, as the store's import takes them.
pub struct Jobs {
    name: String,
    defaults: JobSpec,
    source: Source,
}

enum Source {
    Json {
        reader: Box<dyn BufRead + Send>,
        line: String,
        lineno: usize,
    },
    Csv {
        reader: Box<csv::Reader<QuoteCheck<Box<dyn BufRead + Send>>>>,
        header: Vec<String>,
        record: csv::StringRecord,
    },
}

impl Jobs {
    /// Reads jobs from `reader` (named `name` in messages); fields not given take `defaults`.
    pub fn new(
        reader: Box<dyn BufRead + Send>,
        name: String,
        format: Format,
        defaults: JobSpec,
    ) -> Result<Jobs> {
        let source = match format {
            Format::JsonLines => Source::Json {
                reader,
                line: String::new(),
                lineno: 0,
            },
            Format::Csv => {
                let mut rdr = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .from_reader(QuoteCheck::new(reader));
                let header: Vec<String> = rdr
                    .headers()
                    .map_err(|e| csv_error(&name, &e))?
                    .iter()
                    .map(|h| h.trim().to_string())
                    .collect();
                for h in &header {
                    if h != "job_id" && h != "parents" {
                        fields::field(h).map_err(|e| at_line(&name, 1, e))?;
                    }
                }
                Source::Csv {
                    reader: Box::new(rdr),
                    header,
                    record: csv::StringRecord::new(),
                }
            }
        };
        Ok(Jobs {
            name,
            defaults,
            source,
        })
    }
}

impl Iterator for Jobs {
    type Item = Result<ImportLine, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let name = &self.name;
        match &mut self.source {
            Source::Json {
                reader,
                line,
                lineno,
            } => loop {
                line.clear();
                *lineno += 1;
                match reader.read_line(line) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) => {
                        return Some(Err(StoreError::io(
                            format!("{name}:{lineno}: cannot read"),
                            e,
                        )))
                    }
                }
                let text = line.trim();
                if text.is_empty() || text.starts_with('#') {
                    continue;
                }
                return Some(
                    parse_json_line(text, &self.defaults)
                        .map(|job| ImportLine { line: *lineno, job })
                        .map_err(|e| at_line(name, *lineno, e)),
                );
            },
            Source::Csv {
                reader,
                header,
                record,
            } => match reader.read_record(record) {
                Ok(false) => None,
                Err(e) => Some(Err(csv_error(name, &e))),
                Ok(true) => {
                    let lineno = record.position().map_or(0, |p| p.line() as usize);
                    Some(
                        parse_csv_record(header, record, &self.defaults)
                            .map(|job| ImportLine { line: lineno, job })
                            .map_err(|e| at_line(name, lineno, e)),
                    )
                }
            },
        }
    }
}

/// Reads and checks `jobs` on a thread of its own, handing them on in batches, so that parsing
/// the file overlaps with the store's inserts (on two cores a 1.2M-line import spends a quarter
/// of its time parsing). The first bad line ends the reading: the import stops there anyway.
/// Dropping the returned iterator before its end stops the thread at its next batch.
pub fn read_ahead(jobs: Jobs) -> impl Iterator<Item = Result<ImportLine, StoreError>> {
    const BATCH: usize = 1024;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Result<ImportLine, StoreError>>>(4);
    let reader = std::thread::Builder::new()
        .name("read-jobs".into())
        .spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            for item in jobs {
                let bad = item.is_err();
                batch.push(item);
                if (batch.len() == BATCH || bad)
                    && tx
                        .send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))
                        .is_err()
                {
                    return;
                }
                if bad {
                    return;
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
        });
    let rx = match reader {
        Ok(_) => rx,
        Err(e) => {
            // No thread: the one error says why, and nothing is imported.
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let _ = tx.send(vec![Err(StoreError::io(
                "cannot start a thread to read the jobs",
                e,
            ))]);
            rx
        }
    };
    rx.into_iter().flatten()
}

/// A CSV error as `FILE:LINE: what`.
fn csv_error(name: &str, e: &csv::Error) -> StoreError {
    if let csv::ErrorKind::Io(io) = e.kind() {
        if let Some(q) = io.get_ref().and_then(|i| i.downcast_ref::<QuoteError>()) {
            return at_line(name, q.line as usize, StoreError::Refused(q.to_string()));
        }
        return StoreError::io(
            format!("{name}: cannot read"),
            std::io::Error::new(io.kind(), io.to_string()),
        );
    }
    let line = e.position().map(|p| p.line());
    let what = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("{len} fields, but the header has {expected_len}"),
        csv::ErrorKind::Utf8 { err, .. } => format!("not UTF-8 text: {err}"),
        _ => e.to_string(),
    };
    match line {
        Some(l) => at_line(name, l as usize, StoreError::Refused(what)),
        None => StoreError::Refused(format!("{name}: {what}")),
    }
}

fn bad_field(field: &str, value: &str, expected: &str) -> StoreError {
    StoreError::BadValue {
        field: field.into(),
        value: value.into(),
        expected: expected.into(),
    }
}

/// serde_json's message without its position (` at line 1 column 7`), which counts within the
/// line and would contradict the file's line number.
fn json_problem(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let what = text.strip_suffix(&suffix).unwrap_or(&text);
    format!("not a JSON object: {what} at column {}", e.column())
}

fn parse_json_line(text: &str, defaults: &JobSpec) -> Result<NewJob, StoreError> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| StoreError::Refused(json_problem(&e)))?;
    let serde_json::Value::Object(map) = v else {
        return Err(StoreError::Refused(
            "expected a JSON object, one job per line".into(),
        ));
    };
    let mut new = NewJob {
        job_id: None,
        spec: defaults.clone(),
        parents: vec![],
    };
    for (k, v) in &map {
        match k.as_str() {
            "job_id" => {
                let s = v.as_str().unwrap_or_default();
                new.job_id = Some(
                    Uuid::parse_str(s)
                        .map_err(|_| bad_field("job_id", &v.to_string(), "a UUID"))?,
                );
            }
            "parents" => {
                let list = v
                    .as_array()
                    .ok_or_else(|| bad_field("parents", &v.to_string(), "a list of job ids"))?;
                for p in list {
                    let s = p.as_str().unwrap_or_default();
                    new.parents.push(Uuid::parse_str(s).map_err(|_| {
                        bad_field("parents", &p.to_string(), "full job ids (UUIDs)")
                    })?);
                }
            }
            name => {
                let f = fields::field(name)?;
                let val = f.parse_json(v)?;
                f.apply(&mut new.spec, val);
            }
        }
    }
    Ok(new)
}

fn parse_csv_record(
    header: &[String],
    rec: &csv::StringRecord,
    defaults: &JobSpec,
) -> Result<NewJob, StoreError> {
    let mut new = NewJob {
        job_id: None,
        spec: defaults.clone(),
        parents: vec![],
    };
    for (k, v) in header.iter().zip(rec.iter()) {
        match k.as_str() {
            "job_id" => {
                new.job_id = Some(Uuid::parse_str(v).map_err(|_| bad_field("job_id", v, "a UUID"))?)
            }
            "parents" => {
                for p in v.split([' ', ';']).filter(|s| !s.is_empty()) {
                    new.parents.push(Uuid::parse_str(p).map_err(|_| {
                        bad_field("parents", p, "full job ids separated by spaces")
                    })?);
                }
            }
            name => {
                let f = fields::field(name)?;
                // An empty cell keeps the default, so sparse CSVs work.
                if !v.is_empty() || f.kind == fields::Kind::Text {
                    let val: Value = f.parse_str(v)?;
                    f.apply(&mut new.spec, val);
                }
            }
        }
    }
    Ok(new)
}

/// A quoted CSV field that does not end on the line where it opened.
#[derive(Debug)]
struct QuoteError {
    /// The line where the quote opened.
    line: u64,
    /// Whether the input ended inside the field.
    at_end: bool,
}

impl std::fmt::Display for QuoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.at_end {
            write!(
                f,
                "the quote that opens a field on this line is never closed"
            )?;
        } else {
            write!(
                f,
                "the quote that opens a field on this line is not closed before the line ends"
            )?;
        }
        write!(
            f,
            " (a job field holds no line break; a quote inside a quoted field is written twice: \"\")"
        )
    }
}

impl std::error::Error for QuoteError {}

/// Where a CSV reader is within a record, as far as quotes go (RFC 4180, as the csv crate reads
/// it: a quote opens a field only at its start; `""` inside a quoted field is one quote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuoteState {
    FieldStart,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: the field's end, or the first of `""`.
    QuoteInQuoted,
}

/// Passes CSV bytes through, and fails on a quoted field that runs past the end of its line.
/// The bytes before the error are passed first, so the rows before it are read (and their own
/// problems reported) in order.
struct QuoteCheck<R> {
    inner: R,
    state: QuoteState,
    line: u64,
    /// The line where the open quoted field began.
    opened: u64,
    pending: Option<QuoteError>,
}

impl<R> QuoteCheck<R> {
    fn new(inner: R) -> Self {
        QuoteCheck {
            inner,
            state: QuoteState::FieldStart,
            line: 1,
            opened: 0,
            pending: None,
        }
    }
}

impl<R: Read> Read for QuoteCheck<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(e) = self.pending.take() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            if self.state == QuoteState::Quoted {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    QuoteError {
                        line: self.opened,
                        at_end: true,
                    },
                ));
            }
            return Ok(0);
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            use QuoteState::*;
            self.state = match (self.state, b) {
                (Quoted, b'\n') => {
                    let e = QuoteError {
                        line: self.opened,
                        at_end: false,
                    };
                    // Ok(0) would read as the end of the input.
                    if i == 0 {
                        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                    }
                    self.pending = Some(e);
                    return Ok(i);
                }
                (Quoted, b'"') => QuoteInQuoted,
                (Quoted, _) => Quoted,
                (FieldStart, b'"') => {
                    self.opened = self.line;
                    Quoted
                }
                (QuoteInQuoted, b'"') => Quoted,
                (_, b'\n') => {
                    self.line += 1;
                    FieldStart
                }
                (_, b',') => FieldStart,
                (_, _) => Unquoted,
            };
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(text: &str, format: Format) -> Vec<Result<(usize, NewJob)>> {
        let reader = skip_bom(Box::new(std::io::Cursor::new(text.as_bytes().to_vec()))).unwrap();
        match Jobs::new(
            Box::new(BufReader::new(reader)),
            "f".into(),
            format,
            JobSpec::default(),
        ) {
            // A bad line's message is its Display (`FILE:LINE: what`); the chain repeats it.
            Ok(j) => j
                .map(|r| r.map(|l| (l.line, l.job)).map_err(|e| anyhow!("{e}")))
                .collect(),
            Err(e) => vec![Err(anyhow!("{e}"))],
        }
    }

    fn errors(text: &str, format: Format) -> Vec<String> {
        jobs(text, format)
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e}")))
            .collect()
    }

    #[test]
    fn unterminated_csv_quote_is_refused_naming_its_line() {
        let text = "name,args\na,\"x\nb,y\nc,z\n";
        assert_eq!(
            errors(text, Format::Csv),
            ["f:2: the quote that opens a field on this line is not closed before the line ends \
              (a job field holds no line break; a quote inside a quoted field is written twice: \
              \"\")"]
        );
        // The row before it is read first.
        let names: Vec<String> = jobs("name,args\nok,1\na,\"x\nb,y\n", Format::Csv)
            .into_iter()
            .filter_map(|r| r.ok().map(|(_, j)| j.spec.name))
            .collect();
        assert_eq!(names, ["ok"]);
        // On the last line, without a newline after it.
        assert_eq!(
            errors("name,args\na,\"x", Format::Csv),
            ["f:2: the quote that opens a field on this line is never closed (a job field holds \
              no line break; a quote inside a quoted field is written twice: \"\")"]
        );
    }

    #[test]
    fn csv_quotes_that_close_are_fine() {
        let text = "name,args\na,\"x, \"\"y\"\"\"\nb,plain \"quoted\" words\n";
        let got: Vec<(usize, String, String)> = jobs(text, Format::Csv)
            .into_iter()
            .map(|r| {
                let (l, j) = r.unwrap();
                (l, j.spec.name, j.spec.args)
            })
            .collect();
        assert_eq!(
            got,
            [
                (2, "a".into(), "x, \"y\"".into()),
                (3, "b".into(), "plain \"quoted\" words".into())
            ]
        );
    }

    #[test]
    fn byte_order_marks_are_skipped() {
        let got = jobs("\u{feff}{\"name\": \"a\"}\n", Format::JsonLines);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap().1.spec.name, "a");
        let got = jobs("\u{feff}name,workflow\na,w\n", Format::Csv);
        assert_eq!(got[0].as_ref().unwrap().1.spec.workflow, "w");
    }

    #[test]
    fn messages_name_file_and_line_once() {
        assert_eq!(
            errors(
                "\n{\"name\": \"a\", \"num_nodes\": \"two\"}\n",
                Format::JsonLines
            ),
            ["f:2: bad value \"two\" for num_nodes: expected an integer from 1 to 1000000"]
        );
        assert_eq!(
            errors("{\"name\": \"a\",}\n", Format::JsonLines),
            ["f:1: not a JSON object: trailing comma at column 14"]
        );
        assert_eq!(
            errors("name,num_nodes\na,1,extra\n", Format::Csv),
            ["f:2: 3 fields, but the header has 2"]
        );
        assert_eq!(
            errors("name,nodes\n", Format::Csv)[0],
            format!("f:1: {}", fields::field("nodes").err().unwrap())
        );
    }
}
