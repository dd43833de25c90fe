//! Where the log goes and how it looks: stderr, filtered by `LIFEBOAT_LOG` (a tracing
//! filter, `info` by default), as text or, with `LIFEBOAT_LOG_FORMAT=json`, as one JSON
//! object per line carrying the current span and its parents (a request's id, its
//! attempt), for a log pipeline to index.

use tracing_subscriber::EnvFilter;

use super::CliError;

/// The variable that picks the format.
pub const FORMAT_VAR: &str = "LIFEBOAT_LOG_FORMAT";
/// The variable that holds the filter.
pub const FILTER_VAR: &str = "LIFEBOAT_LOG";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The format named by [`FORMAT_VAR`]'s `value`: unset or empty is text; any case of
    /// `text` or `json`; anything else is an error that names the variable and the choices.
    pub fn from_env_value(value: Option<&str>) -> Result<LogFormat, CliError> {
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(LogFormat::default());
        };
        if value.eq_ignore_ascii_case("text") {
            Ok(LogFormat::Text)
        } else if value.eq_ignore_ascii_case("json") {
            Ok(LogFormat::Json)
        } else {
            Err(CliError::Usage(format!(
                "{FORMAT_VAR}={value:?} is not a log format; expected `text` or `json`"
            )))
        }
    }
}

/// Install the process's log subscriber from the environment.
pub fn init() -> Result<(), CliError> {
    let format = match std::env::var(FORMAT_VAR) {
        Ok(value) => LogFormat::from_env_value(Some(&value))?,
        Err(std::env::VarError::NotPresent) => LogFormat::default(),
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(CliError::Usage(format!(
                "{FORMAT_VAR} is not valid UTF-8; expected `text` or `json`"
            )));
        }
    };
    let filter = EnvFilter::try_from_env(FILTER_VAR).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // `span` is the innermost span, `spans` the whole chain from the request down;
        // `threadName` tells the engine thread's lines from the async workers'.
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_thread_names(true)
            .init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_in_any_case_and_default_to_text() {
        assert_eq!(LogFormat::from_env_value(None).ok(), Some(LogFormat::Text));
        assert_eq!(LogFormat::from_env_value(Some("")).ok(), Some(LogFormat::Text));
        assert_eq!(
            LogFormat::from_env_value(Some("text")).ok(),
            Some(LogFormat::Text)
        );
        assert_eq!(
            LogFormat::from_env_value(Some("json")).ok(),
            Some(LogFormat::Json)
        );
        assert_eq!(
            LogFormat::from_env_value(Some(" JSON ")).ok(),
            Some(LogFormat::Json)
        );
    }

    #[test]
    fn an_unknown_format_names_the_variable_and_the_choices() {
        for bad in ["xml", "jsonl", "pretty"] {
            let Err(error) = LogFormat::from_env_value(Some(bad)) else {
                panic!("{bad} was accepted");
            };
            assert_eq!(error.exit_code(), 2, "bad input, like a bad config");
            let message = error.to_string();
            assert!(
                message.contains("LIFEBOAT_LOG_FORMAT")
                    && message.contains(bad)
                    && message.contains("`text` or `json`"),
                "{message}"
            );
        }
    }
}
