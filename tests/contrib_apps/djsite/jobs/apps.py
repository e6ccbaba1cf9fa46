from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "tests.contrib_apps.djsite.jobs"
    label = "jobs"
    leader_duties = ["tests.contrib_apps.djsite.jobs.duties.tick"]
