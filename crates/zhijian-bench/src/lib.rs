//! The unified comparison protocol: experiments, runs, records, reports.
