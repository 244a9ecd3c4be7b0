"""DVC stage `report`: results/ -> reports/report.md and reports/report.html (no retraining)."""
from l2l import stage
from l2l.claims_report import claims_sections
from l2l.fidelity import report_section as fidelity_section
from l2l.findings import report_top
from l2l.layerwise_analysis import report_section as stage_section
from l2l.report import build
from l2l.sequential_report import looks_section
from l2l.teacher_report import teacher_student_section


def run() -> None:
    build(stage.RESULTS, stage.REPORTS, extra_sections=[report_top, claims_sections, looks_section, stage_section,
                                                           teacher_student_section, fidelity_section])
    stage.log.info("wrote %s/report.md and %s/report.html", stage.REPORTS, stage.REPORTS)


if __name__ == "__main__":
    stage.main(run)
